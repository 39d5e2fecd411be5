"""What exact resume needs beyond the Trainer's own checkpoint: a data order that is a pure function of
(seed, epoch), run totals (loss, tokens) that survive a restart, and no extra step for a finished run.

The Trainer restores weights, optimizer, scheduler, RNG states and the step, and skips the batches of the
resumed epoch that were already trained. Three things it does not restore (transformers 5.24, TRL 1.16):

- The order of a later epoch. ``LengthGroupedSampler`` is built without a generator, so each epoch's shuffle
  is drawn from the global RNG when the epoch's iterator starts; on resume that happens before the RNG state is
  loaded, so from the second epoch on a resumed run trains on other batches than an uninterrupted one.
  :class:`EpochSeededSampler` draws each epoch's order from its own generator seeded with ``seed + epoch``
  (what accelerate's ``SeedableRandomSampler`` does for plain random batches, so those keep today's order),
  identical on every process; accelerate's ``BatchSamplerShard`` then gives each process its share.
- ``train_loss`` is averaged over the steps of the last ``train()`` call only, and TRL's ``num_tokens``
  counter starts at 0 in every process. Both are saved beside each checkpoint (``RUN_TOTALS``) and carried on.
- A run resumed from the checkpoint of its final step trains one step more when its last epoch is not over
  (the stop check runs after a step). :class:`ExactResume` trains nothing then.
- A resume with another number of processes: the Trainer takes the step count and skips ``step x new batch``
  rows of the epoch, so rows are trained twice or never, and the ranks without an RNG file draw other streams.
  The run's topology (nodes, processes per node, world size) is saved beside each checkpoint and a resume with
  another world size is refused (:func:`check_same_world_size`). Another node layout with the same number of
  processes (2 nodes x 1 <-> 1 node x 2) keeps every global rank's data share and RNG state: it resumes exactly.

Use ``with_exact_resume(SFTTrainer)`` (or ``DPOTrainer``) in place of the trainer class.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

from components.common.training.distributed import topology

log = logging.getLogger(__name__)
RUN_TOTALS = "vlmtune_run_totals.json"
SAMPLED_STRATEGIES = ("group_by_length", "random")


class EpochSeededSampler:
    """Row order of one epoch as a pure function of ``(seed, epoch)``.

    With ``lengths``: transformers' length grouping (shuffle, cut into mega-batches of a few ``batch_size``
    batches, sort each by length, longest batch first), shuffled by a generator seeded with ``seed + epoch``. Without:
    a plain permutation from the same generator (the order accelerate's ``SeedableRandomSampler`` gives). The
    Trainer (or :class:`ExactResume`) calls ``set_epoch`` before each epoch, as with torch's DistributedSampler."""

    def __init__(self, num_rows: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1):
        if lengths is not None and len(lengths) != num_rows:
            raise ValueError(f"{len(lengths)} lengths for {num_rows} rows: the length column must have one value per row")
        self.num_rows = num_rows
        self.seed = int(seed)
        self.lengths = lengths
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        import torch

        generator = torch.Generator(device="cpu").manual_seed(self.seed + int(epoch))
        if self.lengths is None:
            return torch.randperm(self.num_rows, generator=generator).tolist()
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)

    def __iter__(self):
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return self.num_rows


class ExactResume:
    """Mixin for a transformers ``Trainer`` subclass (put it first): see the module docstring."""

    _epoch_sampler: EpochSeededSampler | None = None
    _loss_sum_before: float | None = 0.0  # None: resumed from a checkpoint without run totals
    steps_before_resume: int = 0  # optimiser steps and input tokens of the checkpoint this run resumed from
    tokens_before_resume: int = 0

    # --- data order ---------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        from transformers.trainer_utils import has_length

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        strategy = str(getattr(self.args.train_sampling_strategy, "value", self.args.train_sampling_strategy))
        if dataset is None or not has_length(dataset) or strategy not in SAMPLED_STRATEGIES:
            self._epoch_sampler = None
            return super()._get_train_sampler(train_dataset)
        lengths = self._row_lengths(dataset) if strategy == "group_by_length" else None
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # Rows of one optimiser step on one process, as transformers groups them.
        self._epoch_sampler = EpochSeededSampler(
            len(dataset), seed, lengths, batch_size=self.args.train_batch_size * self.args.gradient_accumulation_steps)
        return self._epoch_sampler

    def _row_lengths(self, dataset) -> list[int]:
        # The dataloader's copy of the dataset may have lost the length column (TRL's DPO keeps only the columns
        # its collator reads); the trainer's own train_dataset still has it, row for row.
        column = self.args.length_column_name
        for candidate in (dataset, self.train_dataset):
            names = getattr(candidate, "column_names", None) or []
            if column in names and len(candidate) == len(dataset):
                return [int(n) for n in candidate[column]]
        raise ValueError(f"train_sampling_strategy='group_by_length' needs a {column!r} column (tokens per row) in "
                         f"the train dataset; add it, or set group_by_length=false")

    def _run_epoch(self, *args, **kwargs):
        epoch = kwargs["epoch"] if "epoch" in kwargs else args[1]
        # The Trainer's own set_epoch does not reach the sampler through every wrapper (a resumed epoch of a
        # multi-process run is BatchSamplerShard inside SkipBatchSampler), so set it here, for every epoch.
        if self._epoch_sampler is not None:
            self._epoch_sampler.set_epoch(epoch)
        if self.state.global_step >= self.state.max_steps:
            # Resumed from the checkpoint of the final step: the Trainer would start the epoch and train one
            # step before its stop check. Nothing is left to train.
            log.info("step %d of %d already done: nothing left to train", self.state.global_step, self.state.max_steps)
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # --- run totals -----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._loss_sum_before = 0.0
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            # Read now: the local copy of the checkpoint is deleted once a newer one is saved.
            state = json.loads((Path(resume_from_checkpoint) / "trainer_state.json").read_text())
            self.steps_before_resume = int(state["global_step"])
            self.tokens_before_resume = int(state.get("num_input_tokens_seen") or 0)
            totals = read_run_totals(resume_from_checkpoint) or {}
            check_same_world_size(resume_from_checkpoint, totals, self.args.world_size)
            self._loss_sum_before = None if totals.get("loss_sum") is None else float(totals["loss_sum"])
            if "train_tokens" in totals and hasattr(self, "_total_train_tokens"):  # TRL's num_tokens counter
                self._total_train_tokens = int(totals["train_tokens"])
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        return type(output)(output.global_step, self._run_train_loss(), output.metrics)

    def _run_train_loss(self) -> float:
        """Mean loss per optimiser step over the whole run, steps before a resume included."""
        if self._loss_sum_before is None:  # no totals to carry on: the mean of this call's steps, as the Trainer's
            return self._total_loss_scalar / max(self.state.global_step - self.steps_before_resume, 1)
        return (self._loss_sum_before + self._total_loss_scalar) / max(self.state.global_step, 1)

    def log(self, logs, *args, **kwargs):
        if "train_loss" in logs:  # the end-of-training summary: the whole run, not just this call
            logs = {**logs, "train_loss": self._run_train_loss()}
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        from transformers.trainer_pt_utils import nested_gather

        # Losses since the last log are still in _tr_loss (summed per process); the log would average them over
        # processes, so do the same. Every process gets here (the gather is collective); process 0 writes.
        pending = nested_gather(self._tr_loss.detach(), self.args.parallel_mode).mean().item()
        totals = {
            "step": self.state.global_step,
            "loss_sum": None if self._loss_sum_before is None else self._loss_sum_before + self._total_loss_scalar + pending,
            "train_tokens": int(getattr(self, "_total_train_tokens", 0)),
            **topology(),
        }
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            (folder / RUN_TOTALS).write_text(json.dumps(totals))


def read_run_totals(checkpoint: str | os.PathLike) -> dict | None:
    """The run totals saved beside a local checkpoint folder; None for a checkpoint written before they were."""
    path = Path(checkpoint) / RUN_TOTALS
    if not path.exists():
        log.warning("%s has no %s: train_loss and num_tokens will cover only the steps after the resume", checkpoint, RUN_TOTALS)
        return None
    return json.loads(path.read_text())


def checkpoint_world_size(checkpoint: str | os.PathLike, totals: dict) -> int:
    """Processes of the run that saved ``checkpoint``: from its run totals, else from its RNG files (the
    Trainer writes ``rng_state.pth`` on one process, ``rng_state_<rank>.pth`` per process on several)."""
    if totals.get("world_size"):
        return int(totals["world_size"])
    ranks = list(Path(checkpoint).glob("rng_state_*.pth"))
    return len(ranks) if ranks else 1


def check_same_world_size(checkpoint: str | os.PathLike, totals: dict, world_size: int) -> None:
    """Refuse to resume ``checkpoint`` with another number of processes than the run that saved it."""
    saved = checkpoint_world_size(checkpoint, totals)
    if saved == world_size:
        return
    now = topology()
    before = (f"{totals['nodes']} node(s) x {totals['processes_per_node']} process(es)" if totals.get("nodes")
              else "one node")
    raise ValueError(
        f"{Path(checkpoint).name} was saved by {saved} process(es) ({before}); this run has {world_size} "
        f"({now['nodes']} node(s) x {now['processes_per_node']} process(es)). Resuming with another number of "
        f"processes changes the global batch and the rows each process trains, so it cannot resume exactly. "
        f"Restart with {saved} processes in all (e.g. torchrun --nnodes N --nproc_per_node P with N x P = {saved}; "
        f"the node layout may differ), or start a new run with another --checkpoint-uri.")


@functools.cache
def with_exact_resume(trainer_class: type) -> type:
    """``trainer_class`` (e.g. TRL's SFTTrainer) with :class:`ExactResume` mixed in first."""
    return type(f"{trainer_class.__name__}WithExactResume", (ExactResume, trainer_class), {})
