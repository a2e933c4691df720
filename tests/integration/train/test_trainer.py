"""The Trainer in process: non-finite steps, out-of-memory recovery, freezing, LoRA export, early stopping."""

from __future__ import annotations

import functools
import logging
import operator
import shutil

import pytest
import torch

from weighted_mtp.data import build_loader
from weighted_mtp.errors import WMTPError
from weighted_mtp.models.loading import load_model, load_model_from_config
from weighted_mtp.objectives import BaselineObjective
from weighted_mtp.train.trainer import Trainer, split_batch


def build(ws, name: str, *overrides: str, objective=None, val: bool = False):
    config = ws.config(name, "training.save_every=null", "data.n_samples=8", *overrides)
    model, tokenizer = load_model_from_config(config)
    train = build_loader(config, tokenizer, split="train")
    val_loader = build_loader(config, tokenizer, split="validation", shuffle=False) if val else None
    objective = objective or BaselineObjective(chunk_size=config.training.loss_chunk_size)
    return Trainer(config, model, objective, train, val_loader, tokenizer=tokenizer), model


class Scripted(BaselineObjective):
    """The baseline loss, with faults injected on chosen calls; it also snapshots the weights it sees."""

    def __init__(self, nan_calls=(), oom_above_rows: int | None = None) -> None:
        super().__init__(chunk_size=64)
        self.calls = 0
        self.nan_calls = set(nan_calls)
        self.oom_above_rows = oom_above_rows
        self.rows_seen: list[int] = []
        self.snapshots: list[torch.Tensor] = []

    def step(self, model, batch, counts, *, loss_scale):
        if loss_scale is None:  # validation
            return super().step(model, batch, counts, loss_scale=None)
        self.calls += 1
        if self.oom_above_rows is not None and len(batch) > self.oom_above_rows:
            # a CUDA out-of-memory cannot happen on this CPU machine; raise what torch raises
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.rows_seen.append(len(batch))
        self.snapshots.append(model.extra_heads[0].feed_forward.w2.weight.detach().clone())
        if self.calls in self.nan_calls:
            loss_scale = float("nan")  # poisons every gradient of this step
        return super().step(model, batch, counts, loss_scale=loss_scale)


def test_nonfinite_gradient_skips_the_step(micro_workspace) -> None:
    objective = Scripted(nan_calls={2})
    trainer, _ = build(micro_workspace, "nonfinite", "training.max_steps=3", objective=objective)
    result = trainer.fit()
    assert result.steps == 3 and result.nonfinite_skipped == 1
    before_1, before_2, before_3 = objective.snapshots
    assert not torch.equal(before_1, before_2)  # step 1 updated the weights
    assert torch.equal(before_2, before_3)  # step 2 was skipped
    assert [m["nonfinite_skipped"] for m in result.history] == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(micro_workspace) -> None:
    objective = Scripted(nan_calls={1, 2, 3})
    trainer, _ = build(
        micro_workspace,
        "nonfinite_stop",
        "training.max_steps=5",
        "training.max_nonfinite_in_a_row=3",
        objective=objective,
    )
    with pytest.raises(WMTPError, match="3 non-finite steps in a row"):
        trainer.fit()


def test_out_of_memory_halves_the_micro_batch(micro_workspace, caplog) -> None:
    objective = Scripted(oom_above_rows=1)
    trainer, _ = build(
        micro_workspace, "oom", "training.max_steps=2", "training.batch_size=2", objective=objective
    )
    with caplog.at_level(logging.WARNING):
        result = trainer.fit()
    assert result.steps == 2
    assert objective.rows_seen == [1, 1, 1, 1]  # two micro-batches of one row per step
    assert trainer.state.micro_splits == 2
    warnings = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert len(warnings) == 1 and "halved to 1" in warnings[0] and "2 micro-batches" in warnings[0]


def test_split_batch_keeps_rows_and_pairs(micro_workspace) -> None:
    trainer, _ = build(micro_workspace, "split", "training.batch_size=4", "training.max_steps=1")
    batch = next(iter(trainer.train_loader))
    halves = split_batch(batch, 2)
    assert [len(h) for h in halves] == [2, 2]
    assert torch.equal(torch.cat([h.input_ids for h in halves]), batch.input_ids)
    assert functools.reduce(operator.iadd, (h.problem_ids for h in halves), []) == batch.problem_ids


def test_frozen_trunk_stays_put_and_heads_train(micro_workspace) -> None:
    trainer, model = build(
        micro_workspace,
        "frozen_trunk",
        "training.max_steps=2",
        "training.freeze.trunk=frozen",
        "logging.progress_bar=always",  # the rich progress bar path, as on a terminal
    )
    trunk_before = model.layers[0].attention.wq.weight.detach().clone()
    head_before = model.extra_heads[0].attention.wq.weight.detach().clone()
    trainer.fit()
    assert torch.equal(model.layers[0].attention.wq.weight, trunk_before)
    assert not torch.equal(model.extra_heads[0].attention.wq.weight, head_before)


def test_lora_run_exports_a_merged_model(micro_workspace) -> None:
    trainer, model = build(
        micro_workspace,
        "lora",
        "training.max_steps=3",
        "training.lora.enabled=true",
        "training.lora.r=4",
        "training.lora.alpha=8",
        "training.lora.dropout=0.0",
        "training.lr=1e-2",
    )
    result = trainer.fit()
    assert any(".lora_B." in name for name, _ in model.named_parameters())
    checkpoint = result.checkpoint
    assert any("lora_A" in line for line in _safetensors_keys(checkpoint / "model.safetensors"))
    exported, _ = load_model(result.model_dir)
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        expected = model(tokens, return_all_heads=True).logits
        got = exported(tokens, return_all_heads=True).logits
    base, _ = load_model("micro", n_future_tokens=2, models_dir=micro_workspace.root / "models", seed=42)
    with torch.no_grad():
        untouched = base(tokens, return_all_heads=True).logits
    assert not torch.allclose(untouched, expected, atol=1e-4)  # the adapters learned something
    assert torch.allclose(got, expected, atol=1e-5)


def _safetensors_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def test_validation_epochs_and_early_stopping(micro_workspace) -> None:
    # loss goes down, so "max" never improves after the first validation: patience 1 stops at the second
    trainer, _ = build(
        micro_workspace,
        "early",
        "training.max_steps=12",
        "training.eval_every=3",
        "data.val_split=validation",
        "training.early_stopping.metric=val/loss",
        "training.early_stopping.mode=max",
        "training.early_stopping.patience=1",
        "data.n_samples=4",
        val=True,
    )
    result = trainer.fit()
    assert result.stopped_early and result.steps == 6
    assert set(result.val_metrics) >= {"val/loss", "val/head1/ce", "val/head2/accuracy"}
    assert [m["epoch"] for m in result.history] == [0, 0, 1, 1, 2, 2]  # 2 batches an epoch


class CountingSteps(BaselineObjective):
    """The baseline loss with state of its own: the optimizer steps it was told about."""

    def __init__(self) -> None:
        super().__init__(chunk_size=64)
        self.steps_seen: list[int] = []

    def on_step_end(self, step: int) -> None:
        self.steps_seen.append(step)

    def state_dict(self) -> dict:
        return {"steps_seen": list(self.steps_seen)}

    def load_state_dict(self, state: dict) -> None:
        self.steps_seen = list(state["steps_seen"])


def test_objective_hears_each_step_and_its_state_resumes_with_the_checkpoint(micro_workspace) -> None:
    from weighted_mtp.errors import CheckpointError
    from weighted_mtp.train.checkpoint import checkpoint_name

    first = CountingSteps()
    trainer, _ = build(micro_workspace, "objective_state", "training.max_steps=3", "training.save_every=2",
                       objective=first)  # fmt: skip
    trainer.export_model = False
    trainer.fit()
    assert first.steps_seen == [1, 2, 3]

    checkpoints = micro_workspace.runs / "objective_state" / "checkpoints"
    shutil.rmtree(checkpoints / checkpoint_name(3))  # as if killed after step 2's checkpoint
    resumed = CountingSteps()
    trainer, _ = build(micro_workspace, "objective_state", "training.max_steps=3", "training.save_every=2",
                       objective=resumed)  # fmt: skip
    trainer.export_model = False
    result = trainer.fit()
    assert result.resumed_from == checkpoints / checkpoint_name(2)
    assert resumed.steps_seen == [1, 2, 3]  # 1 and 2 restored from the checkpoint, 3 heard

    # a checkpoint without the objective's state (another pipeline's) is refused, not half-restored
    trainer, _ = build(micro_workspace, "stateless", "training.max_steps=1")
    trainer.export_model = False
    trainer.fit()
    with pytest.raises(CheckpointError, match="no state for the CountingSteps objective"):
        build(micro_workspace, "stateless", "training.max_steps=2", objective=CountingSteps())[0].fit()
