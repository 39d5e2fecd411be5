"""Build the embedded default base model: a tiny Idefics3 (SmolVLM architecture), entirely offline.

It has SmolVLM's structure (SigLIP-style vision tower, pixel-shuffle connector, Llama text model, image
splitting into row/col tiles plus a global image, the SmolVLM chat template) at a size that trains in
seconds on a CPU. Weights are random but deterministic for a seed; the tokenizer is trained on the spot.

    vlmtune tiny-model --output ./tiny-smolvlm

Any real model id or folder (e.g. ``HuggingFaceTB/SmolVLM-256M-Instruct``) can be used in its place.
"""
from __future__ import annotations

import json
from pathlib import Path

# SmolVLM-Instruct's chat template: "User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
)

# Text the tokenizer is trained on: enough English for the demo questions, answers and ordinary prompts.
_CORPUS = """
User: Assistant: System: Assistant: red Assistant: green Assistant: blue Assistant: yellow What colour is the shape? What shape is it? How many shapes are there?
Where is the shape? Is it on the left or the right, at the top or the bottom, in the middle?
red green blue yellow purple orange white black grey circle square triangle star one two three four five
zero six seven eight nine ten left right top bottom centre center middle upper lower small large big
Describe the image. The image shows a picture of several objects. Answer with one word. Answer briefly.
yes no the a an of in on at is are there what which how many where who why when this that image images
video frame frames first second third compare describe count colours shapes answer question
You are a helpful assistant that answers questions about images.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 % . , ? ! : ; ' " - ( )
"""


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on a small corpus: encodes any text, no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
        model_max_length=2048,
        padding_side="right",
    )


def build_tiny_model(
    output: str | Path,
    seed: int = 0,
    image_size: int = 64,
    longest_edge: int = 128,
    *,
    patch_size: int = 16,
    scale_factor: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    text_hidden_size: int = 64,
    text_layers: int = 2,
) -> Path:
    """Write a tiny Idefics3 model + processor to ``output`` and return the folder.

    Vision: 2 layers x 32, patch 16, 64 px tiles; scale factor 2 -> 4 tokens per tile. Images are resized to
    ``longest_edge`` (128) and split into 64 px tiles plus a global view, as SmolVLM does at 1536/384 px.
    The keyword knobs change the shape (the demo uses ``scale_factor=1`` and a 4 x 128 text model:
    ``pipelines/demo.py`` DEMO_MODEL); the defaults are what the tests build.
    """
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config={
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": text_hidden_size,
            "intermediate_size": 2 * text_hidden_size,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "tie_word_embeddings": False,
        },
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(output, safe_serialization=True)
    processor.save_pretrained(output)
    (output / "vlmtune_tiny_model.json").write_text(
        json.dumps({"seed": seed, "image_size": image_size, "longest_edge": longest_edge,
                    "parameters": sum(p.numel() for p in model.parameters())}, indent=2)
    )
    return output
