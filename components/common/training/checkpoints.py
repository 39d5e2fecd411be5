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
from components.common.training.distributed import any_process, distributed, is_node_leader, local_rank, node_rank

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
#
# Several nodes: each node has its own work folder (local disk), so a checkpoint folder of node 0 holds the
# weights, optimizer and its own processes' RNG states, and every other node's folder only its processes'
# ``rng_state_<rank>.pth``. Global rank 0 uploads its folder, then local rank 0 of every other node uploads its
# node's RNG files into the same ``checkpoint-N``, then rank 0 writes ``COMPLETE``: a marked checkpoint holds
# every rank's RNG state. On resume, local rank 0 of every node downloads the checkpoint into its node's folder.
# The RNG files are the Trainer's ``torch.save`` dicts, read back with ``torch.load(weights_only=True)``
# (tensors and plain values only, no arbitrary pickles), as the optimizer and scheduler states are.


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

    In a multi-process run the output_dir is shared by the processes of a node (see ``trainer_work_dir``): local
    rank 0 of every node downloads, the others wait, and all resume from their node's copy (each reads its own
    ``rng_state_<rank>.pth``). Rank 0 picks the checkpoint and tells the others, so every node resumes the same
    one even if the listing changed meanwhile."""
    dist = distributed()
    if dist is None:
        latest = latest_complete_checkpoint(checkpoint_uri)
    else:
        chosen = [latest_complete_checkpoint(checkpoint_uri) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(chosen, src=0)
        latest = chosen[0]
    local = output_dir / latest.rstrip("/").split("/")[-1] if latest else None
    if latest is not None and (dist is None or is_node_leader()):
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
    multi-process run, one folder per node shared by that node's processes, because each process writes its own
    RNG state into the same checkpoint folder as its node's copy of the weights. The node rank is part of the
    folder's name, so two "nodes" on one machine (tests) keep apart as two machines would."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        with tempfile.TemporaryDirectory(prefix=prefix) as work:
            yield work
        return
    run_key = "|".join([os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_ADDR", ""),
                        os.environ.get("MASTER_PORT", ""), str(node_rank()), str(output_uri)])
    work = Path(tempfile.gettempdir()) / f"{prefix}{hashlib.sha256(run_key.encode()).hexdigest()[:16]}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield str(work)
    finally:
        if local_rank() == 0:
            shutil.rmtree(work, ignore_errors=True)


def publish_checkpoint(local: Path, checkpoint_uri: str, step: int, remove_local: bool = False,
                       mark: bool = True) -> str:
    """Copy a finished local checkpoint folder to ``<checkpoint_uri>/checkpoint-<step>``, marker last.

    A folder already there (a run killed while uploading the same step) loses its marker first and is cleared,
    so stale files never sit beside new ones under a marker. ``remove_local`` deletes the local folder once the
    marker is written (never when the local folder is the published one). ``mark=False`` leaves the marker to
    :func:`mark_checkpoint_complete`, once the other nodes have added their RNG states."""
    target = storage.join(checkpoint_uri, f"checkpoint-{step}")
    same_place = not storage.is_remote(target) and storage.to_local_path(target).resolve() == local.resolve()
    if not same_place:
        storage.delete(storage.join(target, CHECKPOINT_MARKER))
        storage.delete(target)
        storage.upload_dir(local, target)
    if mark:
        mark_checkpoint_complete(target, step)
    if remove_local and not same_place:
        shutil.rmtree(local, ignore_errors=True)
    return target


def mark_checkpoint_complete(target: str, step: int) -> None:
    storage.write_text(storage.join(target, CHECKPOINT_MARKER), json.dumps({"step": step, "time": time.time()}))
    log.info("checkpoint %s published", target)


def upload_rng_states(local: Path, target: str) -> list[str]:
    """Upload the ``rng_state_<rank>.pth`` files of this node's checkpoint folder into ``target`` (a node
    other than global rank 0's: its processes' RNG states exist only on its own disk)."""
    uploaded = []
    for path in sorted(local.glob("rng_state_*.pth")):
        uri = storage.join(target, path.name)
        storage.write_bytes(uri, path.read_bytes())
        uploaded.append(uri)
    if not uploaded:
        raise FileNotFoundError(f"{local} holds no rng_state_<rank>.pth: this node's processes saved no RNG state "
                                f"for {target}, so it cannot be marked complete")
    return uploaded


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
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            # The published copy is all a resume needs: the local one goes, so the work folder holds no more
            # than the checkpoint being written (and save_total_limit=1 bounds it if a delete fails).
            if dist is None:
                publish_checkpoint(local, checkpoint_uri, state.global_step, remove_local=True)
            else:
                dist.barrier()  # every rank has written its rng_state_<rank>.pth on its node's disk
                if state.is_world_process_zero:  # weights, optimizer, its node's RNG states; no marker yet
                    publish_checkpoint(local, checkpoint_uri, state.global_step, mark=False)
                dist.barrier()  # the target is cleared and holds node 0's files
                target = storage.join(checkpoint_uri, f"checkpoint-{state.global_step}")
                if is_node_leader() and not state.is_world_process_zero:  # another node: add its RNG states
                    upload_rng_states(local, target)
                    shutil.rmtree(local, ignore_errors=True)
                dist.barrier()  # every node's RNG states are there
                if state.is_world_process_zero:
                    mark_checkpoint_complete(target, state.global_step)
                    if not (not storage.is_remote(target) and storage.to_local_path(target).resolve() == local.resolve()):
                        shutil.rmtree(local, ignore_errors=True)
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
