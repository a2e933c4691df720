"""The trainer's validation metrics are those of the whole validation set in one piece.

On variable-length sequences, `val/loss` and every head's loss, cross-entropy and accuracy equal one
`mtp_forward_backward(loss_scale=None)` call on all validation rows at once, for two validation batch sizes; the old rule
(each batch's own means, averaged over batches) gives something else on the same data.
"""

from __future__ import annotations

import pytest

from weighted_mtp.data import build_loader
from weighted_mtp.losses import IGNORE_INDEX, mtp_forward_backward
from weighted_mtp.models.loading import load_model_from_config
from weighted_mtp.objectives import BaselineObjective
from weighted_mtp.objectives.base import loss_metrics
from weighted_mtp.train.trainer import Trainer

ROWS = 7  # batches of 2 or 3 leave a short last batch
VARIABLE = (
    f"data.n_samples={ROWS}",
    "data.max_length=192",
    "data.val_split=validation",
    "training.save_every=null",
)


def validation_trainer(ws, batch_size: int) -> tuple[Trainer, object]:
    config = ws.config(f"val_norm_{batch_size}", *VARIABLE, f"training.batch_size={batch_size}")
    model, tokenizer = load_model_from_config(config)  # the same seed: the same weights every time
    train = build_loader(config, tokenizer, split="train")
    val = build_loader(config, tokenizer, split="validation", shuffle=False)
    trainer = Trainer(config, model, BaselineObjective(chunk_size=64), train, val, export_model=False)
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    return trainer, val


def whole_set_metrics(ws) -> dict[str, float]:
    """One call on every validation row at once: the token-weighted metrics of the set."""
    config = ws.config("val_norm_whole", *VARIABLE, f"training.batch_size={ROWS}")
    model, tokenizer = load_model_from_config(config)
    (batch,) = list(build_loader(config, tokenizer, split="validation", shuffle=False))
    assert len(batch) == ROWS
    model.eval()
    out = mtp_forward_backward(
        model, batch.input_ids, batch.labels, attention_mask=batch.attention_mask, chunk_size=64, loss_scale=None
    )
    return {f"val/{key}": value for key, value in loss_metrics(out).items()}


def mean_of_batch_means(trainer: Trainer, val) -> float:
    trainer.modules.eval()
    val.set_epoch(0)
    losses = [trainer.objective.evaluate(trainer.model, batch)["loss"] for batch in val]
    return sum(losses) / len(losses)


def test_validation_metrics_are_token_weighted_over_the_whole_set(micro_workspace) -> None:
    expected = whole_set_metrics(micro_workspace)
    keys = [key for key in expected if key.startswith("val/head")] + ["val/loss"]
    assert len(keys) == 7  # loss, and loss / ce / accuracy of both heads
    for batch_size in (2, 3):
        trainer, val = validation_trainer(micro_workspace, batch_size)
        val.set_epoch(0)
        targets = [int((batch.labels != IGNORE_INDEX).sum()) for batch in val]
        assert len(targets) == -(-ROWS // batch_size) and len(set(targets)) == len(targets)  # uneven
        metrics = trainer._validate()
        for key in keys:
            assert metrics[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (batch_size, key)
        assert metrics == trainer._validate()  # a second pass reads the same batches
        old = mean_of_batch_means(trainer, val)
        assert abs(old - expected["val/loss"]) > 1e-3, batch_size
