"""The training loop every pipeline shares.

`train/run.py` builds the model, the loaders and the pipeline's `Objective` (the loss); the
`Trainer` does the rest: what trains and how it is spread over devices (`parallelize.py`: full,
LoRA or frozen per part, activation checkpointing, FSDP2 or data-parallel), AdamW with warmup + cosine, gradient accumulation and clipping, skipping non-finite steps,
validation and early stopping, logging, and checkpoints from which a killed run resumes exactly.

One step:  take `grad_accum_steps` batches -> count every loss's terms (e.g. each head's target
tokens) over all the step's micro-batches and ranks -> per micro-batch: objective.step
(it runs its own backward of its share of the step's loss: sums divided by those global counts) ->
average gradients across ranks -> clip -> if loss and gradient norm are finite, optimizer step ->
scheduler step. The step's loss and gradients are therefore those of its global batch in one piece,
whatever the accumulation, the out-of-memory splitting or the number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import resource
import shutil
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weighted_mtp.config import save_resolved_config
from weighted_mtp.config.schema import Config
from weighted_mtp.errors import CheckpointError, ConfigError, DataError, WMTPError
from weighted_mtp.io import atomic_write_json
from weighted_mtp.models.loading import autocast_dtype, training_autocast
from weighted_mtp.objectives.base import WEIGHT_BIN_EDGES, Objective, weight_histogram_counts
from weighted_mtp.train import distributed as D
from weighted_mtp.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from weighted_mtp.train.metrics_file import MetricsFile
from weighted_mtp.train.optim import build_optimizer, build_scheduler
from weighted_mtp.train.parallelize import parallelize

log = logging.getLogger(__name__)

HISTOGRAM_BATCHES = 8  # validation batches whose token weights each validation draws
MICRO_SPLITS_FILE = "micro_splits.json"  # written when FSDP runs out of memory: the split to resume with


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class LoopState:
    """Where the loop stands: what a checkpoint saves besides modules, optimizer, scheduler and data
    position, and a resumed run restores."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    micro_splits: int = 1  # each batch is cut into this many micro-batches (halved on out-of-memory)
    nonfinite_total: int = 0  # steps skipped for a non-finite loss or gradient
    nonfinite_in_a_row: int = 0
    best_metric: float | None = None  # early stopping
    evals_without_improvement: int = 0
    stopped_early: bool = False
    tracker_run_id: str | None = None  # a resumed run logs into the same tracker run


@dataclass
class TrainResult:
    steps: int
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)  # the last step's
    val_metrics: dict[str, float] = field(default_factory=dict)  # the last validation's
    history: list[dict[str, float]] = field(default_factory=list)  # every step this process ran
    nonfinite_skipped: int = 0
    stopped_early: bool = False
    resumed_from: Path | None = None
    checkpoint: Path | None = None
    model_dir: Path | None = None
    tracking_run_id: str | None = None  # the MLflow run, when tracking is enabled


# What a checkpoint's tensors depend on: resuming across a change of any of these cannot work.
RUN_SHAPE_KEYS = (
    "experiment.pipeline", "model.name", "model.n_future_tokens", "model.value_head", "model.tokenizer",
    "training.freeze", "training.lora.enabled", "training.lora.r", "training.lora.target_modules",
)


def check_same_run(saved_config: Path, config: Config) -> None:
    """Refuse to resume a run directory that holds a run of another shape, naming the difference."""
    if not saved_config.is_file():
        return
    from weighted_mtp.config import load_saved_config

    saved = load_saved_config(saved_config).model_dump(mode="json")
    current = config.model_dump(mode="json")
    for key in RUN_SHAPE_KEYS:
        there, here = saved, current
        for part in key.split("."):
            there, here = (there or {}).get(part), (here or {}).get(part)
        if there != here:
            raise ConfigError(
                f"{saved_config.parent}: holds a checkpoint of another run ({key} is {there!r} there, {here!r} "
                f"here); set a new experiment.name, or start over with --fresh"
            )


def trunk_only_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trunk's trainable parameters that no head shares (a tied embedding is the unembedding too)."""
    from weighted_mtp.models.lora import model_parts

    parts = model_parts(model)
    heads = {id(p) for _, module in parts["heads"] for p in module.parameters()}
    return [p for _, module in parts["trunk"] for p in module.parameters() if p.requires_grad and id(p) not in heads]


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Cut a batch into `parts` smaller ones by rows; pairs (rows 2i, 2i+1) stay together."""
    if parts == 1:
        return [batch]
    rows = len(batch.input_ids)
    unit = 2 if getattr(batch, "is_pair", False) else 1
    size = max(unit, -(-rows // parts // unit) * unit)
    pieces = []
    for start in range(0, rows, size):
        values = {}
        for f in dataclasses.fields(batch):
            value = getattr(batch, f.name)
            if isinstance(value, torch.Tensor | list) and len(value) == rows:
                value = value[start : start + size]
            values[f.name] = value
        pieces.append(type(batch)(**values))
    return pieces


class Trainer:
    def __init__(
        self,
        config: Config,
        model: nn.Module,
        objective: Objective,
        train_loader: Any,
        val_loader: Any | None = None,
        tracker: Any | None = None,
        *,
        env: D.DistEnv | None = None,
        s3_store: Any | None = None,
        tokenizer: Any | None = None,
        export_model: bool = True,
        pending_weights: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.training = config.training
        self.env = env or D.DistEnv(device=D.resolve_device(config.device))
        self.objective = objective
        self.train_loader = train_loader
        self.val_loader = val_loader
        if tracker is None:
            from weighted_mtp.tracking import NullTracker

            tracker = NullTracker()
        self.tracker = tracker
        self.s3_store = s3_store
        self.tokenizer = tokenizer
        self.export_model = export_model
        self.run_dir = Path(config.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_file = MetricsFile(self.run_dir / "metrics.jsonl")
        self._check_config()

        seed_everything(config.seed)
        extra = dict(objective.trainable_modules())
        self.strategy = parallelize(model, extra, config, self.env, pending_weights=pending_weights,
                                    frozen_models=objective.frozen_modules())
        self.model = model
        self.modules = nn.ModuleDict({"model": model, **extra})
        self.trainable = [p for p in self.modules.parameters() if p.requires_grad]
        if autocast_dtype(config, self.env.device) is not None:
            log.info("mixed precision: float32 weights and optimizer state, %s products (autocast on %s)",
                     self.config.dtype, self.env.device.type)
        self.trunk_warmup = trunk_only_parameters(model) if config.training.freeze.trunk_steps else []
        self.optimizer = build_optimizer(
            self.modules.named_parameters(),
            lr=self.training.lr,
            weight_decay=self.training.weight_decay,
            betas=tuple(self.training.betas),
        )
        self.total_steps = self._planned_steps()
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=self.training.warmup_steps,
            total_steps=self.total_steps,
            min_lr_ratio=self.training.min_lr_ratio,
        )

        self.state = LoopState()
        self._iterator: Iterator | None = None
        self._last_saved_step = -1
        self._last_eval_step = -1
        self._val_counts: dict[str, float] | None = None  # the validation set's, counted once
        self._last_checkpoint: Path | None = None
        self._val_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ setup

    def _check_config(self) -> None:
        stopping = self.training.early_stopping
        if stopping.metric is not None and (self.val_loader is None or self.training.eval_every is None):
            raise ConfigError(
                "training.early_stopping.metric needs validation: set training.eval_every and data.val_split"
            )
        if self.training.max_steps is None and len(self.train_loader) == 0:
            raise DataError(
                "the training data is empty: no batch to train on (check data.split / data.n_samples)"
            )
        if self.training.freeze.trunk_steps and self.env.is_distributed and self.env.strategy == "fsdp":
            raise ConfigError("training.freeze.trunk_steps: not with FSDP (its units fix which parameters train); "
                              "use distributed.strategy=ddp or one process")

    def _planned_steps(self) -> int:
        if self.training.max_steps is not None:
            return self.training.max_steps
        per_epoch = max(1, -(-len(self.train_loader) // self.training.grad_accum_steps))
        return self.training.epochs * per_epoch

    # ------------------------------------------------------------------ fit

    def fit(self, resume: bool = False, fresh: bool = False) -> TrainResult:
        """Train to the end (max_steps, epochs or early stopping), resuming from a checkpoint if any.

        A checkpoint in the run directory (or in the run's S3 prefix) is always resumed from;
        `resume=True` additionally insists that there is one; `fresh=True` starts over instead,
        removing what an earlier run left in the run directory (checkpoints, metrics, export).
        """
        if resume and fresh:
            raise ConfigError("--resume and --fresh contradict each other: continue the run, or start it over")
        if fresh:
            self._clear_run_dir()
            resumed_from = None
        else:
            resumed_from = self._restore(required=resume)  # before any write: a failed --resume leaves no trace
        self._agree_on_micro_splits()
        self._freeze_trunk_while_warming_up()
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved_config(self.config, self.run_dir)
            self.metrics_file.trim(self.state.step)
        self.tracker.start(self.config, run_id=self.state.tracker_run_id)
        self.state.tracker_run_id = self.tracker.run_id
        history: list[dict[str, float]] = []
        metrics: dict[str, float] = {}
        status = "FAILED"
        try:
            with self._progress() as advance:
                while self.state.step < self.total_steps and not self.state.stopped_early:
                    batches = self._next_batches()
                    if not batches:
                        break
                    metrics = self._train_step(batches)
                    history.append(metrics)
                    self._record(metrics)
                    advance(metrics)
                    if self.training.eval_every and self.state.step % self.training.eval_every == 0:
                        self._validate()
                    if self.training.save_every and self.state.step % self.training.save_every == 0:
                        self._save()
            if self.val_loader is not None and self._last_eval_step != self.state.step and not self.state.stopped_early:
                self._validate()
            if self._last_saved_step != self.state.step:
                self._save()
            model_dir = self._export() if self.export_model else None
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.env.is_main and self.metrics_file.path.is_file():
                with contextlib.suppress(Exception):
                    self.tracker.log_artifact(self.metrics_file.path)
            if self.env.is_main and history and status == "FINISHED":
                self._plot(history)
            self.tracker.end(status)
        return TrainResult(
            steps=self.state.step,
            run_dir=self.run_dir,
            metrics=metrics,
            val_metrics=self._val_metrics,
            history=history,
            nonfinite_skipped=self.state.nonfinite_total,
            stopped_early=self.state.stopped_early,
            resumed_from=resumed_from,
            checkpoint=self._last_checkpoint,
            model_dir=model_dir,
            tracking_run_id=self.state.tracker_run_id,
        )

    # ------------------------------------------------------------------ data

    def _next_batches(self) -> list[Any]:
        """The next `grad_accum_steps` batches, moving on to the next epoch when one ends."""
        batches: list[Any] = []
        empty_epochs = 0
        while len(batches) < self.training.grad_accum_steps:
            if self._iterator is None:
                if self.training.max_steps is None and self.state.epoch >= self.training.epochs:
                    break
                self.train_loader.set_epoch(self.state.epoch)
                self._iterator = iter(self.train_loader)
            try:
                batches.append(next(self._iterator))
                empty_epochs = 0
            except StopIteration:
                self._iterator = None
                self.state.epoch += 1
                empty_epochs += 1
                if empty_epochs > 1:
                    raise DataError("the training loader yielded no batch for a whole epoch") from None
        return batches

    # ------------------------------------------------------------------ one step

    def _train_step(self, batches: list[Any]) -> dict[str, float]:
        started = time.perf_counter()
        while True:
            try:
                sums, tokens = self._accumulate(batches)
                out_of_memory = False
            except torch.OutOfMemoryError:
                if self.strategy == "fsdp":
                    self._stop_for_smaller_micro_batches(batches)
                out_of_memory = True
            if self.strategy == "ddp":
                out_of_memory = D.all_reduce_max(float(out_of_memory), self.env) > 0
            if not out_of_memory:
                break
            self._halve_micro_batch(batches)

        if self.strategy == "ddp":
            D.all_reduce_gradients(self.trainable, self.env)
        metrics = D.all_reduce_sum(sums, self.env)  # shares of the global batch's values
        tokens = D.all_reduce_sum({"tokens": float(tokens)}, self.env)["tokens"]
        grad_norm = self._clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        if math.isfinite(metrics["loss"]) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.state.nonfinite_in_a_row = 0
        else:
            self.state.nonfinite_total += 1
            self.state.nonfinite_in_a_row += 1
            log.warning(
                "step %d: non-finite %s; step skipped (%d in a row, %d in all)",
                self.state.step + 1,
                "loss" if not math.isfinite(metrics["loss"]) else "gradient norm",
                self.state.nonfinite_in_a_row,
                self.state.nonfinite_total,
            )
            if self.state.nonfinite_in_a_row >= self.training.max_nonfinite_in_a_row:
                raise WMTPError(
                    f"{self.state.nonfinite_in_a_row} non-finite steps in a row (training.max_nonfinite_in_a_row="
                    f"{self.training.max_nonfinite_in_a_row}); lower training.lr or check the data"
                )
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # a skipped first step would otherwise warn that the scheduler stepped before the optimizer
            warnings.filterwarnings(
                "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
            )
            self.scheduler.step()
        self.state.step += 1
        self.objective.on_step_end(self.state.step)  # e.g. refresh a value snapshot
        self._freeze_trunk_while_warming_up()

        elapsed = time.perf_counter() - started
        metrics.update(
            {
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                "step_time_s": elapsed,
                "memory/peak_gib": self._peak_memory_gib(),
                "nonfinite_skipped": float(self.state.nonfinite_total),
                "epoch": float(self.state.epoch),
            }
        )
        return metrics

    def _accumulate(self, batches: list[Any]) -> tuple[dict[str, float], int]:
        """Run the step's micro-batches; return the sums of their metrics (their shares of the step's
        values on this rank) and this rank's number of tokens.

        Each micro-batch's losses are divided by their global counts, so the micro-batches' gradients
        add up to this rank's share of the global batch's gradient. The ranks' gradients are then
        averaged (FSDP's reduce-scatter, `D.all_reduce_gradients`), so the shares are scaled by the
        world size: the average of world_size x share_r over ranks is the sum of the shares.
        """
        micro = [  # on the device once: the step's statistics and its backward passes read the same copies
            piece.to(self.env.device) for batch in batches for piece in split_batch(batch, self.state.micro_splits)
        ]
        global_counts = self._global_counts(micro)
        sums: dict[str, float] = defaultdict(float)
        tokens = 0
        self.modules.train()
        with self._autocast():  # statistics over the whole step (e.g. the critic weights' z-score)
            self.objective.prepare_step(self.model, micro, functools.partial(D.all_reduce_sum, env=self.env))
        self._reshard()
        for batch in micro:  # under FSDP every micro-batch reduce-scatters its gradients (see docs/training.md)
            with self._autocast():
                metrics = self.objective.step(
                    self.model, batch, global_counts, loss_scale=float(self.env.world_size)
                )
            for key, value in metrics.items():
                sums[key] += float(value)
            tokens += int(batch.attention_mask.sum())
        if "loss" not in sums:
            raise TypeError(f"{type(self.objective).__name__}.step must return a 'loss' metric")
        return dict(sums), tokens

    def _global_counts(self, batches: Iterable[Any]) -> dict[str, float]:
        """The objective's loss denominators summed over these batches (a step's micro-batches, a
        validation pass) on every rank."""
        counts: dict[str, float] = defaultdict(float)
        for batch in batches:
            for key, value in self.objective.token_counts(self.model, batch).items():
                counts[key] += float(value)
        return D.all_reduce_sum(dict(counts), self.env)

    def _freeze_trunk_while_warming_up(self) -> None:
        """The trunk's trainable parameters take no gradient before `freeze.trunk_steps` steps (AdamW
        skips a parameter without one), and train from then on; a resumed run picks up the phase."""
        if not self.trunk_warmup:
            return
        frozen = self.state.step < self.training.freeze.trunk_steps
        if self.trunk_warmup[0].requires_grad == frozen:
            for param in self.trunk_warmup:
                param.requires_grad_(not frozen)
            log.info("step %d: trunk %s", self.state.step, "frozen while the heads warm up" if frozen else "training")

    def _stop_for_smaller_micro_batches(self, batches: list[Any]) -> None:
        """Out of memory under FSDP: the other ranks wait inside the step's collectives, so no rank can
        retry in step. This rank records the halved micro-batch in the run directory and the job stops;
        relaunched (torchrun --max-restarts, a SLURM requeue, by hand), every rank resumes from the
        last checkpoint and agrees on the smallest micro-batch any rank recorded (`_agree_on_micro_splits`)."""
        self._halve_micro_batch(batches)
        atomic_write_json(self.run_dir / MICRO_SPLITS_FILE,
                          {"step": self.state.step + 1, "micro_splits": self.state.micro_splits})
        raise WMTPError(
            f"out of GPU memory under FSDP at step {self.state.step + 1}: the other ranks are inside collectives, "
            f"so the job stops; relaunched (torchrun --max-restarts, a SLURM requeue or by hand) it resumes from the "
            f"last checkpoint with {self.state.micro_splits} micro-batches per batch on every rank "
            f"({self.run_dir / MICRO_SPLITS_FILE})"
        )

    def _agree_on_micro_splits(self) -> None:
        """Every rank takes the largest split recorded after an out-of-memory stop (the run directory
        may be on one node only: one all-reduce shares it) or restored from the checkpoint."""
        recorded = self.run_dir / MICRO_SPLITS_FILE
        splits = self.state.micro_splits
        if recorded.is_file():
            splits = max(splits, int(json.loads(recorded.read_text(encoding="utf-8"))["micro_splits"]))
        agreed = int(D.all_reduce_max(float(splits), self.env))
        if agreed != self.state.micro_splits:
            log.warning("each batch is cut into %d micro-batches, as recorded after running out of memory", agreed)
            self.state.micro_splits = agreed

    def _halve_micro_batch(self, batches: list[Any]) -> None:
        rows = len(batches[0].input_ids)
        unit = 2 if getattr(batches[0], "is_pair", False) else 1
        if rows // self.state.micro_splits <= unit:
            raise WMTPError(
                f"out of GPU memory with a micro-batch of {unit} sequence(s); lower data.max_length "
                "or enable model.activation_checkpointing / training.lora"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.state.micro_splits *= 2
        log.warning(
            "step %d: out of GPU memory; micro-batch halved to %d, accumulation doubled to %d micro-batches per step",
            self.state.step + 1,
            -(-rows // self.state.micro_splits),
            self.training.grad_accum_steps * self.state.micro_splits,
        )

    def _clip_gradients(self) -> float:
        """Global gradient norm (over every rank's shards), clipped to training.grad_clip if set."""
        max_norm = self.training.grad_clip if self.training.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm, error_if_nonfinite=False)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _autocast(self):
        return training_autocast(self.config, self.env.device)

    def _peak_memory_gib(self) -> float:
        if self.env.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.env.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Metrics of the whole validation set, as if it were one batch: like a step's loss, every
        batch's metrics are its shares of the pass's totals (counted first, over every rank), and
        their sum over batches and ranks is the term-weighted value, whatever the batch size."""
        self.modules.eval()
        if self._val_counts is None:  # the same batches every pass (epoch 0): count them once, no model
            self.val_loader.set_epoch(0)
            self._val_counts = self._global_counts(self.val_loader)
        self.val_loader.set_epoch(0)
        sums: dict[str, float] = defaultdict(float)
        histogram: dict[str, float] = defaultdict(float)  # head 1's weights on the first batches
        for i, batch in enumerate(self.val_loader):
            batch = batch.to(self.env.device)
            with torch.no_grad(), self._autocast():
                metrics = self.objective.step(self.model, batch, self._val_counts, loss_scale=None)
                shaded = self.objective.token_weights(self.model, batch) if i < HISTOGRAM_BATCHES else None
            for key, value in metrics.items():
                sums[key] += float(value)
            if shaded is not None and shaded.weights is not None:
                for key, value in weight_histogram_counts(shaded.weights, batch.labels, batch.rewards).items():
                    histogram[key] += value
        self.modules.train()
        self._reshard()
        metrics = D.all_reduce_sum({f"val/{key}": value for key, value in sums.items()}, self.env)
        summary = self.objective.evaluation_summary()  # metrics of the whole pass (AUC)
        if summary:
            metrics.update(D.all_reduce_mean({f"val/{key}": value for key, value in summary.items()}, self.env))
        self._val_metrics = metrics
        self._last_eval_step = self.state.step
        if histogram:
            self._weight_histogram(D.all_reduce_sum(dict(histogram), self.env))
        if self.env.is_main:
            self.tracker.log_metrics(metrics, self.state.step)
            self.metrics_file.append({"step": self.state.step, **metrics})
            log.info("step %d validation: %s", self.state.step, _format(metrics))
        self._update_early_stopping(metrics)
        return metrics

    def _weight_histogram(self, counts: dict[str, float]) -> None:
        """plots/weights-step_<N>.png in the run directory (and the tracker's run): how head 1's weights
        spread over the first validation batches' tokens, passing and failing solutions apart. Not
        drawn when every weight is 1 (the baseline)."""
        from weighted_mtp.plots import weight_histogram

        n_bins = len(WEIGHT_BIN_EDGES)
        rows = {label: [counts[f"{label}/{i}"] for i in range(n_bins)] for label in ("passing", "failing")}
        one = int(torch.bucketize(torch.tensor(1.0, dtype=torch.float64),
                                  torch.tensor(WEIGHT_BIN_EDGES[1:-1], dtype=torch.float64))) + 1
        if not self.env.is_main or all(v == 0 for row in rows.values() for i, v in enumerate(row) if i != one):
            return
        rows = {label: row for label, row in rows.items() if sum(row) > 0}
        path = weight_histogram(rows, WEIGHT_BIN_EDGES, f"{self.config.experiment.name}, step {self.state.step}: "
                                "validation token weights",
                                self.run_dir / "plots" / f"weights-step_{self.state.step:06d}.png")
        self.tracker.log_artifact(path, artifact_path="plots")

    def _reshard(self) -> None:
        """Free parameters a no-grad forward left gathered (the root is not resharded after forward)."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.modules.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _update_early_stopping(self, metrics: dict[str, float]) -> None:
        stopping = self.training.early_stopping
        if stopping.metric is None:
            return
        if stopping.metric not in metrics:
            raise ConfigError(
                f"training.early_stopping.metric: {stopping.metric!r} is not a validation metric "
                f"(logged: {', '.join(sorted(metrics))})"
            )
        value = metrics[stopping.metric]
        better = self.state.best_metric is None or (
            value < self.state.best_metric if stopping.mode == "min" else value > self.state.best_metric
        )
        if better:
            self.state.best_metric, self.state.evals_without_improvement = value, 0
            return
        self.state.evals_without_improvement += 1
        if self.state.evals_without_improvement >= stopping.patience:
            self.state.stopped_early = True
            log.info(
                "early stopping at step %d: %s has not improved on %.6g for %d validations",
                self.state.step,
                stopping.metric,
                self.state.best_metric,
                self.state.evals_without_improvement,
            )

    # ------------------------------------------------------------------ logging

    def _record(self, metrics: dict[str, float]) -> None:
        if not self.env.is_main:
            return
        self.metrics_file.append({"step": self.state.step, **metrics})
        every = self.config.logging.every_n_steps
        if self.state.step % every == 0 or self.state.step == self.total_steps:
            self.tracker.log_metrics(metrics, self.state.step)
            if not self._bar_enabled():
                keys = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "memory/peak_gib")
                log.info("step %d/%d %s", self.state.step, self.total_steps, _format({k: metrics[k] for k in keys}))

    def _bar_enabled(self) -> bool:
        mode = self.config.logging.progress_bar
        return self.env.is_main and (mode == "always" or (mode == "auto" and sys.stderr.isatty()))

    @contextlib.contextmanager
    def _progress(self):
        if not self._bar_enabled():
            yield lambda metrics: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task("train", total=self.total_steps, completed=self.state.step, status="")
            yield lambda m: progress.update(
                task, completed=self.state.step, status=f"loss {m['loss']:.4f}  {m['tokens_per_s']:,.0f} tok/s"
            )

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.state),
            "scheduler": self.scheduler.state_dict(),
            "total_steps": self.total_steps,
            "objective": self.objective.state_dict(),  # besides its trained modules (a value snapshot)
        }

    def _save(self) -> Path:
        path = save_checkpoint(
            self.checkpoint_dir,
            self.state.step,
            modules=self.modules,
            optimizer=self.optimizer,
            trainer_state=self._trainer_state(),
            loader_state=self.train_loader.state_dict(),
            config=self.config,
            env=self.env,
            fmt=self.config.distributed.checkpoint_format,
        )
        self._last_saved_step = self.state.step
        self._last_checkpoint = path
        if self.env.is_main:
            prune_checkpoints(self.checkpoint_dir, self.training.keep_last)
            location = str(path)
            if self.s3_store is not None:
                location = self.s3_store.upload_checkpoint(path, path.name)
                self.s3_store.prune_checkpoints(self.training.keep_last)
            self.tracker.log_checkpoint(location, self.state.step)
            log.info("step %d: checkpoint %s", self.state.step, location)
        D.barrier(self.env)
        return path

    def _clear_run_dir(self) -> None:
        """What an earlier run of this experiment left locally; its S3 checkpoints stay where they are."""
        if self.env.is_main:
            for name in ("checkpoints", "final"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            for name in ("metrics.jsonl", "config.yaml", MICRO_SPLITS_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
            log.info("%s: starting over (--fresh)", self.run_dir)
        D.barrier(self.env)

    def _find_checkpoint(self) -> Path | None:
        """The newest complete local checkpoint, else the newest one in S3 (downloaded first)."""
        local = latest_checkpoint(self.checkpoint_dir)
        if local is not None or self.s3_store is None:
            return local
        name = self.s3_store.latest_complete_checkpoint()
        if name is None:
            return None
        return self.s3_store.download_checkpoint(name, self.checkpoint_dir / name)

    def _restore(self, *, required: bool) -> Path | None:
        found = self._find_checkpoint() if self.env.is_main else None
        path = D.broadcast_object(found, self.env)
        if path is None:
            if required:
                raise CheckpointError(
                    f"{self.checkpoint_dir}: --resume given but there is no complete checkpoint"
                )
            return None
        path = Path(path)
        check_same_run(self.run_dir / "config.yaml", self.config)
        log.info("resuming from %s", path)
        trainer_state, rank_state = load_checkpoint(
            path, modules=self.modules, optimizer=self.optimizer, env=self.env,
            untrained_allowed=bool(self.trunk_warmup),
        )
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.state = LoopState(**{f.name: trainer_state[f.name] for f in dataclasses.fields(LoopState)})
        objective_state = trainer_state.get("objective") or {}
        if self.objective.state_dict().keys() != objective_state.keys():
            raise CheckpointError(
                f"{path}: has no state for the {type(self.objective).__name__} objective "
                "(saved by an older version or another pipeline)"
            )
        self.objective.load_state_dict(objective_state)
        self._last_saved_step = self._last_eval_step = self.state.step
        self._last_checkpoint = path
        if rank_state["loader"] is not None:
            self.train_loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        return path

    # ------------------------------------------------------------------ export

    def _export(self) -> Path:
        """The trained model as a standalone directory (LoRA merged), registered with the tracker."""
        from weighted_mtp.train.export import export_trained_model

        model_dir = export_trained_model(
            self.run_dir / "final", self.modules, self.config, self.env, tokenizer=self.tokenizer,
            tracking_run_id=self.state.tracker_run_id,
        )
        if self.env.is_main and model_dir is not None and self.config.tracking.register_model:
            self._register(model_dir)
        return model_dir

    def _register(self, model_dir: Path) -> None:
        """One copy of the model in the tracker, where it is registered: the full export, or for a
        LoRA run only its PEFT adapter (megabytes, not the merged model's hundreds), tagged with the
        base model it applies to."""
        from weighted_mtp.models.checkpoints.hf import ADAPTER_DIR

        adapter = model_dir / ADAPTER_DIR
        if adapter.is_dir():
            self.tracker.set_tags({"model.kind": "peft_adapter", "model.base": self.config.model.name})
            self.tracker.register_model(adapter, registered_model_name(self.config))
        else:
            self.tracker.register_model(model_dir, registered_model_name(self.config))

    def _plot(self, history: list[dict[str, float]]) -> None:
        """training-curves.png in the run directory, and as an artifact of the tracker's run."""
        from weighted_mtp.plots import training_curves

        keys = [key for key in CURVES if any(key in row for row in history)]
        if not keys:
            return
        path = training_curves({self.config.experiment.name: history}, keys, self.run_dir / "training-curves.png")
        self.tracker.log_artifact(path, artifact_path="plots")


CURVES = ("loss", "head1/loss", "head2/loss", "value/loss", "weights/mean", "weights/std", "grad_norm", "lr")


def registered_model_name(config: Config) -> str:
    """<experiment>-<model>: runs of one recipe on different models are different registered models."""
    name = Path(config.model.name)
    base = name.parent.name if name.name == "final" else name.name
    return f"{config.experiment.name}-{base.removesuffix('.gguf')}"


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{key} {value:.4g}" for key, value in metrics.items())
