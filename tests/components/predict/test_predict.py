"""``vlmtune predict`` and the Predictor API: one image, two images, a batch file, a video; plain model, trained
adapter artifact and registry reference. Answers are compared with ``generate_answers`` run directly on the
same inputs (greedy decoding is deterministic), and batched answers with one-by-one answers (left padding)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from components.common.generation import GenerationOptions, generate_answers
from components.predict import api
from components.predict.api import Predictor, conversation, load_image
from components.predict.video import NotAVideoError, frame_indices, sample_frames
from pipelines.cli import main

OPTIONS = GenerationOptions(max_new_tokens=6)
GEN_ARGS = ["--max-new-tokens", "6", "--threads", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return Predictor.from_ref(str(tiny_model_dir))


@pytest.fixture(scope="module")
def sft(sft_model_dir):
    return Predictor.from_ref(str(sft_model_dir))


@pytest.fixture(scope="module")
def demo_rows(demo_data_dir):
    """The first demo rows: (id, question, absolute image path)."""
    folder = Path(demo_data_dir) / "sft"
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    return [(r["id"], r["question"], folder / r["image"]) for r in rows[:8]]


def direct(predictor: Predictor, question: str, images: list, **kwargs) -> str:
    """The answer generate_answers gives for one prompt, without the predict code in between."""
    loaded = [load_image(i) for i in images]
    return generate_answers(predictor.model, predictor.processor, [conversation(question, len(loaded))], [loaded],
                            batch_size=1, options=OPTIONS, **kwargs)[0]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def spy(monkeypatch):
    """Records what predict hands to generate_answers, and still generates."""
    calls = []

    def recording(model, processor, conversations, images=None, batch_size=16, options=None, progress=False,
                  processor_kwargs=None):
        calls.append({"conversations": conversations, "images": [list(i) for i in images],
                      "processor_kwargs": processor_kwargs, "batch_size": batch_size})
        return generate_answers(model, processor, conversations, images, batch_size, options, progress, processor_kwargs)

    monkeypatch.setattr(api, "generate_answers", recording)
    return calls


# ---------------------------------------------------------------------------------------------------------
# Video frames


BAR = 4  # pixels per frame index in the test videos


def make_video(path: Path, n_frames: int) -> Path:
    """Frame i is dark with a white bar at x = 4i..4i+3: its index can be read back even after lossy coding."""
    import numpy as np

    width = BAR * n_frames + (-BAR * n_frames) % 16
    arrays = []
    for i in range(n_frames):
        a = np.full((32, width, 3), 30, dtype=np.uint8)
        a[:, BAR * i:BAR * (i + 1)] = 255
        arrays.append(a)
    if path.suffix == ".gif":
        frames = [Image.fromarray(a) for a in arrays]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)
        return path
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, 32, "yuv420p"
        for a in arrays:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        container.mux(stream.encode())
    return path


def frame_index(image: Image.Image) -> int:
    import numpy as np

    columns = np.asarray(image.convert("L"), dtype=float).mean(axis=0)
    blocks = columns[: len(columns) // BAR * BAR].reshape(-1, BAR).mean(axis=1)
    return int(blocks.argmax())


def test_frame_indices_spread_evenly_in_order():
    assert frame_indices(30, 4) == [0, 10, 19, 29]
    assert frame_indices(30, 1) == [15]
    assert frame_indices(3, 8) == [0, 1, 2]  # never a frame twice
    assert frame_indices(10, 10) == list(range(10))
    for total in range(1, 40):
        for n in range(1, 12):
            picks = frame_indices(total, n)
            assert len(picks) == min(n, total) and picks == sorted(set(picks)) and 0 <= picks[0] and picks[-1] < total
    with pytest.raises(ValueError, match="at least 1"):
        frame_indices(10, 0)


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_sample_frames_are_the_evenly_spaced_ones_in_temporal_order(tmp_path, suffix):
    video = make_video(tmp_path / f"clip{suffix}", 30)
    frames = sample_frames(video, 4)
    assert [frame_index(f) for f in frames] == [0, 10, 19, 29]
    assert all(f.mode == "RGB" and f.size == (128, 32) for f in frames)
    assert [frame_index(f) for f in sample_frames(video, 50)] == list(range(30))


def test_sample_frames_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample_frames(tmp_path / "missing.mp4", 4)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    pytest.importorskip("av")
    with pytest.raises(ValueError, match="cannot decode video .*junk.mp4"):
        sample_frames(junk, 4)


def _still_images(folder: Path) -> dict[str, Path]:
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    paths = {name: folder / name for name in ("photo.png", "photo.jpg", "one-frame.gif", "camera.mpo")}
    red.save(paths["photo.png"])
    red.save(paths["photo.jpg"])
    red.save(paths["one-frame.gif"])
    red.save(paths["camera.mpo"], save_all=True, append_images=[blue])  # two pictures, one moment: still a photo
    return paths


@pytest.mark.parametrize("name, what", [
    ("photo.png", "is a still PNG image (one frame), not a video"),
    ("photo.jpg", "is a still JPEG image, not a video"),
    ("one-frame.gif", "is a still GIF image (one frame), not a video"),
    ("camera.mpo", "is a still MPO image, not a video"),
])
def test_a_still_image_is_not_a_video(tmp_path, name, what):
    path = _still_images(tmp_path)[name]
    with pytest.raises(NotAVideoError) as caught:
        sample_frames(path, 4)
    message = str(caught.value)
    assert message.startswith(f"{str(path)!r} {what}: --video needs a video with more than one frame")
    assert "pass it with --image" in message


def test_a_one_frame_video_or_audio_file_is_not_a_video(tmp_path):
    import numpy as np

    av = pytest.importorskip("av")
    one = make_video(tmp_path / "one.mp4", 1)
    with pytest.raises(NotAVideoError, match=r"one.mp4' is a single frame \(a still image\), not a video"):
        sample_frames(one, 4)
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(NotAVideoError, match=r"tone.wav' is a file without a video stream, not a video"):
        sample_frames(audio, 4)
    # Two frames are a video.
    assert [frame_index(f) for f in sample_frames(make_video(tmp_path / "two.mp4", 2), 4)] == [0, 1]


def test_a_truncated_animation_is_a_decode_error_not_a_crash(tmp_path):
    data = make_video(tmp_path / "clip.gif", 30).read_bytes()
    cut = tmp_path / "cut.gif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot decode video .*cut.gif.*check that the file is complete"):
        sample_frames(cut, 4)


# ---------------------------------------------------------------------------------------------------------
# CLI: one image, two images, a video (tiny model)


def test_predict_one_image(capsys, tiny, tiny_model_dir, demo_rows, spy):
    _, question, image = demo_rows[0]
    rc, out, _ = run_cli(capsys, "--model", tiny_model_dir, "--image", image, "--question", question, *GEN_ARGS)
    assert rc == 0
    assert out == direct(tiny, question, [image]) + "\n"
    assert len(spy) == 1 and len(spy[0]["images"][0]) == 1
    assert spy[0]["conversations"][0][0]["content"][-1] == {"type": "text", "text": question}


def test_predict_two_images_in_one_prompt(capsys, tiny, tiny_model_dir, demo_rows, spy):
    (_, question, first), (_, _, second) = demo_rows[0], demo_rows[1]
    rc, out, _ = run_cli(capsys, "--model", tiny_model_dir, "--image", first, "--image", second,
                         "--question", "Which image shows a circle?", *GEN_ARGS)
    assert rc == 0
    assert out.strip() == direct(tiny, "Which image shows a circle?", [first, second])
    (call,) = spy
    sent = call["images"][0]
    assert len(sent) == 2
    assert list(sent[0].getdata()) == list(load_image(first).getdata())  # in the order given
    assert list(sent[1].getdata()) == list(load_image(second).getdata())
    assert [part["type"] for part in call["conversations"][0][0]["content"]] == ["image", "image", "text"]


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_predict_video_uses_n_frames_in_order(capsys, tmp_path, tiny, tiny_model_dir, spy, suffix):
    video = make_video(tmp_path / f"clip{suffix}", 30)
    rc, out, _ = run_cli(capsys, "--model", tiny_model_dir, "--video", video, "--frames", 5,
                         "--question", "What changes?", *GEN_ARGS)
    assert rc == 0
    (call,) = spy
    frames = call["images"][0]
    assert [frame_index(f) for f in frames] == frame_indices(30, 5) == [0, 7, 14, 22, 29]
    assert [part["type"] for part in call["conversations"][0][0]["content"]] == ["image"] * 5 + ["text"]
    assert call["processor_kwargs"] == {"do_image_splitting": False}  # one tile per frame
    assert out.strip() == direct(tiny, "What changes?", frames, processor_kwargs={"do_image_splitting": False})
    assert tiny.ask_video("What changes?", video, frames=5, options=OPTIONS) == out.strip()


def test_video_frames_are_one_tile_each(tiny, tmp_path):
    """Without splitting, each frame is one global tile; split, the same frames take more tokens."""
    frames = sample_frames(make_video(tmp_path / "clip.gif", 12), 3)
    text = tiny.processor.apply_chat_template(conversation("q", 3), add_generation_prompt=True)
    one = tiny.processor(text=[text], images=[frames], return_tensors="pt", do_image_splitting=False)
    split = tiny.processor(text=[text], images=[frames], return_tensors="pt")
    assert one["pixel_values"].shape[1] == 3
    assert split["input_ids"].shape[1] > one["input_ids"].shape[1]


# ---------------------------------------------------------------------------------------------------------
# Batch file, trained adapter artifact


def write_batch(tmp_path: Path, demo_rows) -> Path:
    """Six rows with ids, relative paths, one of them with two images (prompts of different lengths)."""
    images = tmp_path / "imgs"
    images.mkdir()
    lines = []
    for i, (row_id, question, image) in enumerate(demo_rows[:6]):
        Image.open(image).save(images / image.name)
        row = {"id": row_id, "question": question, "image": f"imgs/{image.name}"}
        if i == 2:
            Image.open(demo_rows[7][2]).save(images / demo_rows[7][2].name)
            row = {"id": row_id, "question": "Compare the two images.", "images": [f"imgs/{image.name}", f"imgs/{demo_rows[7][2].name}"]}
        lines.append(json.dumps(row))
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    return batch


def test_predict_batch_file_with_trained_adapter(capsys, tmp_path, sft, sft_model_dir, demo_rows, spy):
    batch = write_batch(tmp_path, demo_rows)
    out_file = tmp_path / "out" / "answers.jsonl"
    rc, out, err = run_cli(capsys, "--model", sft_model_dir, "--batch", batch, "--output", out_file,
                           "--batch-size", 4, "--no-progress", *GEN_ARGS)
    assert rc == 0, err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert not (tmp_path / "out" / "answers.jsonl.partial").exists()
    inputs = [json.loads(line) for line in batch.read_text().splitlines()]
    assert [r["id"] for r in records] == [r["id"] for r in inputs]
    assert [r["question"] for r in records] == [r["question"] for r in inputs]
    assert records[2]["images"] == [str(tmp_path / p) for p in inputs[2]["images"]]
    assert [c["batch_size"] for c in spy] == [4, 4] and [len(c["conversations"]) for c in spy] == [4, 2]
    # Left padding: each batched answer equals the answer to that prompt alone.
    one_by_one = [direct(sft, r["question"], r["images"]) for r in records]
    assert [r["answer"] for r in records] == one_by_one


def test_batch_to_stdout_and_api_batch_equals_single(capsys, tmp_path, tiny, tiny_model_dir, demo_rows):
    batch = write_batch(tmp_path, demo_rows)
    rc, out, _ = run_cli(capsys, "--model", tiny_model_dir, "--batch", batch, "--batch-size", 3, *GEN_ARGS)
    assert rc == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 6
    rows = [json.loads(line) for line in batch.read_text().splitlines()]
    answers = tiny.ask_batch(rows, batch_size=6, options=OPTIONS, base_dir=tmp_path)
    assert answers == [r["answer"] for r in records]
    assert answers == [tiny.ask(r["question"], r["images"], OPTIONS) for r in records]


def test_adapter_artifact_loads_merged_on_its_base(tiny, sft, demo_rows):
    """The trained artifact is not the base: its merged weights differ and it answers through them."""
    import torch

    changed = [n for n, p in sft.model.named_parameters()
               if not torch.equal(p, dict(tiny.model.named_parameters())[n])]
    assert changed, "the adapter artifact loaded as the bare base model"
    assert not any("lora" in n for n, _ in sft.model.named_parameters())  # merged, not wrapped


# ---------------------------------------------------------------------------------------------------------
# Registry references


def test_predict_from_registry_reference(capsys, tmp_path, sft, sft_model_dir, demo_rows, monkeypatch):
    from components.common.registry import open_registry

    registry = tmp_path / "registry"
    version = open_registry(str(registry)).register("shapes", str(sft_model_dir), content_hash="a" * 64, metrics={},
                                                   lineage={}, card="test card")
    assert version.version == 1
    _, question, image = demo_rows[3]
    expected = direct(sft, question, [image])
    for args in (["--model", f"{registry}::shapes@champion"],
                 ["--model", "shapes@1", "--registry", registry]):
        rc, out, err = run_cli(capsys, *args, "--image", image, "--question", question, *GEN_ARGS)
        assert rc == 0, err
        assert out.strip() == expected
    monkeypatch.setenv("VLMTUNE_REGISTRY", str(registry))
    # the registry's own copy (changed on purpose: references used to resolve to the registered folder itself)
    assert Predictor.from_ref("shapes@latest").model_uri == version.model_uri == str(
        registry / "shapes" / "versions" / "000001" / "model")
    rc, _, err = run_cli(capsys, "--model", "shapes@7", "--image", image)
    assert rc == 2 and "no version 7 of model 'shapes'" in err


def test_the_champion_outlives_its_pipeline_root(capsys, tmp_path, sft, sft_model_dir, demo_rows):
    """Register through the register step, delete the pipeline root the model was trained into, and predict
    from ``REGISTRY::NAME@champion``: the registry's copy answers exactly as the trained model did."""
    import shutil

    from components.common import artifacts
    from components.register import core

    root = tmp_path / "pipeline-root"
    shutil.copytree(sft_model_dir, root / "run-1" / "sft")
    (root / "run-1" / "eval").mkdir()
    artifacts.write_manifest(str(root / "run-1" / "eval"), {"kind": "vlmtune.evaluation", "passed": True,
                                                            "primary_metric": "exact_match", "metrics": {},
                                                            "champion": None, "champion_registry": None})
    registry = tmp_path / "registry"
    result = core.run(str(root / "run-1" / "sft"), str(root / "run-1" / "eval"), str(registry), "shapes")
    assert result["champion"] and result["source_uri"] == str(root / "run-1" / "sft")
    shutil.rmtree(root)

    _, question, image = demo_rows[5]
    rc, out, err = run_cli(capsys, "--model", f"{registry}::shapes@champion", "--image", image, "--question", question,
                           *GEN_ARGS)
    assert rc == 0, err
    assert out.strip() == direct(sft, question, [image])
    assert not root.exists() and Path(result["model_uri"]).is_relative_to(registry)


# ---------------------------------------------------------------------------------------------------------
# Bad input: named, before any model is loaded (the model path does not exist, so loading would fail)


def test_bad_inputs_are_named(capsys, tmp_path, demo_rows):
    model = tmp_path / "no-model-here"
    rc, _, err = run_cli(capsys, "--model", model, "--image", tmp_path / "missing.png")
    assert rc == 2 and "missing.png' does not exist" in err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    rc, _, err = run_cli(capsys, "--model", model, "--image", bad)
    assert rc == 2 and "bad.png' cannot be read as an image" in err
    batch = tmp_path / "rows.jsonl"
    good = json.dumps({"question": "q", "image": str(demo_rows[0][2])})
    batch.write_text("\n".join([good, "{not json", json.dumps({"image": str(demo_rows[0][2])}), good,
                                json.dumps({"question": "q", "image": "nowhere.png"})]) + "\n")
    rc, _, err = run_cli(capsys, "--model", model, "--batch", batch)
    assert rc == 2
    assert "3 problem(s)" in err
    assert "line 2: not valid JSON" in err
    assert "line 3: missing the 'question' field" in err
    assert f"line 5: image file '{tmp_path / 'nowhere.png'}' does not exist" in err
    rc, _, err = run_cli(capsys, "--model", model, "--video", tmp_path / "none.mp4")
    assert rc == 2 and "none.mp4' does not exist" in err
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 20)
    rc, _, err = run_cli(capsys, "--model", model, "--video", junk)
    assert rc == 2 and ("cannot decode video" in err or "install PyAV" in err)
    for still in _still_images(tmp_path).values():  # predict --video photo.png: refused, the model never loaded
        rc, out, err = run_cli(capsys, "--model", model, "--video", still)
        assert rc == 2 and out == ""
        assert err.startswith(f"error: {str(still)!r} is a still ") and "not a video" in err and "--image" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "--model", model, "--image", demo_rows[0][2], "--max-new-tokens", 0,
                         "--do-sample", "--temperature", 0, "--top-p", 1.5)
    assert rc == 2
    assert all(s in err for s in ("max_new_tokens must be at least 1", "temperature must be above 0", "top_p must be in"))


def test_unreadable_image_in_batch_is_named_with_its_line(tmp_path, tiny, demo_rows):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    batch = tmp_path / "rows.jsonl"
    batch.write_text(json.dumps({"question": "q", "image": str(demo_rows[0][2])}) + "\n"
                     + json.dumps({"question": "q", "image": "bad.png"}) + "\n")
    rows = api.read_batch_file(batch)  # the file exists, so it passes the up-front check
    with pytest.raises(ValueError, match=r"bad.png' \(line 2\) cannot be read as an image"):
        tiny.ask_batch(rows, options=OPTIONS)


# ---------------------------------------------------------------------------------------------------------
# The generation benchmark runs, and its two contenders agree


def test_generate_benchmark_contenders_give_identical_answers(tmp_path, tiny_model_dir, prepared_sft, capsys):
    from benchmarks.generate import main as bench

    result = bench(["--model", str(tiny_model_dir), "--dataset", str(prepared_sft), "--workdir", str(tmp_path),
                    "--max-rows", "5", "--batch-size", "2", "--max-new-tokens", "4", "--threads", "1"])
    assert result["rows"] == 5 and result["answers_identical"] is True
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
