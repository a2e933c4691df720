"""Plots: real PNGs whose pixels show the data (not a blank canvas), written atomically."""

from __future__ import annotations

import pytest

from weighted_mtp.plots import pass_at_k_chart, training_curves


def non_white_fraction(path) -> float:
    import matplotlib.image

    pixels = matplotlib.image.imread(path)[..., :3]
    return float((pixels < 0.95).any(axis=-1).mean())


def test_training_curves_draw_every_logged_metric(tmp_path):
    histories = {
        "a": [{"loss": 3.0 - 0.1 * i, "head1/ce": 2.0} for i in range(20)],
        "b": [{"loss": 2.5, "weights/mean": 1.0 + 0.01 * i} for i in range(10)],
    }
    path = training_curves(histories, ["loss", "head1/ce", "weights/mean", "never/logged"], tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert non_white_fraction(path) > 0.02
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # no temporary file left
    with pytest.raises(ValueError, match="none of"):
        training_curves(histories, ["never/logged"], tmp_path / "d.png")


def test_pass_at_k_chart_has_a_bar_per_arm(tmp_path):
    rows = {"base": {"mean": 0.1, "ci_low": 0.05, "ci_high": 0.15}, "mtp": {"mean": 0.2, "ci_low": 0.1, "ci_high": 0.3}}
    path = pass_at_k_chart(rows, "mbpp", tmp_path / "p.png")
    assert non_white_fraction(path) > 0.02
