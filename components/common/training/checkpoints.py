"""Checkpoints in object storage that survive preemption, and resuming from the newest complete one."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from components.common import storage
from components.common.training.distributed import any_process, distributed

log = logging.getLogger(__name__)
CHECKPOINT_MARKER = "COMPLETE"


# --- checkpoints in object storage -------------------------------------------------------------------
#
# The HF Trainer writes a complete checkpoint folder (adapter or model, optimizer, scheduler, RNG state of
# every process, trainer_state.json with the step and log history) into its local output_dir; the callback
# below copies that folder to ``<checkpoint_uri>/checkpoint-N`` and writes ``COMPLETE`` last. On start, the
# newest folder with a marker is copied back and handed to ``trainer.train(resume_from_checkpoint=...)``,
# which restores all of the above and skips the batches already seen. The data order of every epoch, the run's
# loss and token totals, and "nothing left to train" are ``resume.py``'s part. A local checkpoint is deleted
# once published. A folder without its marker (a writer killed mid-upload) is ignored and overwritten by the
# next save.


def _checkpoint_step(name: str) -> int | None:
    prefix = "checkpoint-"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return int(name[len(prefix):])
    return None


def latest_complete_checkpoint(checkpoint_uri: str | None) -> str | None:
    """URI of the newest ``checkpoint-N`` under ``checkpoint_uri`` whose marker exists (written last)."""
    if not checkpoint_uri:
        return None
    root = str(checkpoint_uri).rstrip("/")
    steps = []
    for uri in storage.list_files(checkpoint_uri):
        parts = uri[len(root) + 1:].split("/")
        if len(parts) == 2 and parts[1] == CHECKPOINT_MARKER and _checkpoint_step(parts[0]) is not None:
            steps.append(_checkpoint_step(parts[0]))
    return storage.join(checkpoint_uri, f"checkpoint-{max(steps)}") if steps else None


def fetch_checkpoint(checkpoint_uri: str | None, output_dir: Path) -> str | None:
    """Copy the latest complete checkpoint into the trainer's output_dir; return its local path.

    In a multi-process run the output_dir is shared (see ``trainer_work_dir``): process 0 downloads, the others
    wait, and all resume from the same folder (each reads its own ``rng_state_<rank>.pth``)."""
    latest = latest_complete_checkpoint(checkpoint_uri)
    dist = distributed()
    local = output_dir / latest.rstrip("/").split("/")[-1] if latest else None
    if latest is not None and (dist is None or dist.get_rank() == 0):
        if storage.is_remote(latest) or Path(storage.to_local_path(latest)).resolve() != local.resolve():
            if local.exists():
                shutil.rmtree(local)
            storage.download_dir(latest, local)
            (local / CHECKPOINT_MARKER).unlink(missing_ok=True)
    if dist is not None:
        dist.barrier()
    if latest is None:
        return None
    log.info("resuming from %s", latest)
    return str(local)


@contextlib.contextmanager
def trainer_work_dir(prefix: str, output_uri: str):
    """The Trainer's local output_dir (checkpoints are written here, then published). A temporary folder; in a
    multi-process run on one node, one folder shared by all processes, because each process writes its own
    RNG state into the same checkpoint folder as process 0's weights and optimizer."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        with tempfile.TemporaryDirectory(prefix=prefix) as work:
            yield work
        return
    run_key = "|".join([os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_ADDR", ""),
                        os.environ.get("MASTER_PORT", ""), str(output_uri)])
    work = Path(tempfile.gettempdir()) / f"{prefix}{hashlib.sha256(run_key.encode()).hexdigest()[:16]}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield str(work)
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(work, ignore_errors=True)


def publish_checkpoint(local: Path, checkpoint_uri: str, step: int, remove_local: bool = False) -> str:
    """Copy a finished local checkpoint folder to ``<checkpoint_uri>/checkpoint-<step>``, marker last.

    A folder already there (a run killed while uploading the same step) loses its marker first and is cleared,
    so stale files never sit beside new ones under a marker. ``remove_local`` deletes the local folder once the
    marker is written (never when the local folder is the published one)."""
    target = storage.join(checkpoint_uri, f"checkpoint-{step}")
    same_place = not storage.is_remote(target) and storage.to_local_path(target).resolve() == local.resolve()
    if not same_place:
        storage.delete(storage.join(target, CHECKPOINT_MARKER))
        storage.delete(target)
        storage.upload_dir(local, target)
    storage.write_text(storage.join(target, CHECKPOINT_MARKER), json.dumps({"step": step, "time": time.time()}))
    log.info("checkpoint %s published", target)
    if remove_local and not same_place:
        shutil.rmtree(local, ignore_errors=True)
    return target


def make_checkpoint_callback(checkpoint_uri: str | None):
    """A TrainerCallback that publishes each checkpoint to object storage (marker last) and turns SIGTERM
    (how Vertex spot VMs and Kubernetes announce preemption) into save-at-the-end-of-this-step, then exit 143.

    The save happens after the optimiser step in progress (a partial gradient-accumulation window cannot be
    resumed), so keep one optimiser step well under the grace period (30 s on Vertex spot, 30 s by default
    on Kubernetes: ``terminationGracePeriodSeconds``)."""
    from transformers import TrainerCallback

    class CheckpointToStorage(TrainerCallback):
        def __init__(self):
            self.sigterm = False
            self.previous_handler = None

        def on_train_begin(self, args, state, control, **kwargs):
            def handle_sigterm(signum, frame):
                log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
                self.sigterm = True

            if checkpoint_uri:
                self.previous_handler = signal.signal(signal.SIGTERM, handle_sigterm)

        def on_step_end(self, args, state, control, **kwargs):
            if checkpoint_uri and any_process(self.sigterm):
                self.sigterm = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            if not checkpoint_uri:
                return
            dist = distributed()
            if dist is not None:
                dist.barrier()  # every rank has written its rng_state_<rank>.pth
            if state.is_world_process_zero:
                # The published copy is all a resume needs: the local one goes, so the work folder holds no more
                # than the checkpoint being written (and save_total_limit=1 bounds it if a delete fails).
                publish_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", checkpoint_uri,
                                   state.global_step, remove_local=True)
            if dist is not None:
                dist.barrier()  # nobody exits before the marker is written
            if self.sigterm:
                log.warning("checkpoint-%d is safe; exiting with status 143 (SIGTERM)", state.global_step)
                self.on_train_end(args, state, control)
                raise SystemExit(143)

        def on_train_end(self, args, state, control, **kwargs):
            if self.previous_handler is not None:
                signal.signal(signal.SIGTERM, self.previous_handler)
                self.previous_handler = None

    return CheckpointToStorage()
