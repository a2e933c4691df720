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


def test_a_run_keeps_its_colour_in_every_panel(tmp_path):
    """Run b alone logs weights/mean: its panel (the last of three side by side) shows b's colour (C1,
    orange), not the first colour of the cycle (C0, blue) that the first run drawn in a panel got before."""
    import matplotlib.image

    histories = {
        "a": [{"loss": 3.0 - 0.1 * i} for i in range(20)],
        "b": [{"loss": 2.5, "weights/mean": 1.0 + 0.01 * i} for i in range(20)],
    }
    path = training_curves(histories, ["loss", "head1/ce", "weights/mean"], tmp_path / "c.png")
    pixels = matplotlib.image.imread(path)[..., :3]
    last_panel = pixels[:, 2 * pixels.shape[1] // 3 :]

    def near(colour: tuple[float, float, float]) -> int:
        return int((abs(last_panel - colour).max(axis=-1) < 0.08).sum())

    assert near((1.0, 0.498, 0.055)) > 50  # C1, orange
    assert near((0.122, 0.467, 0.706)) == 0  # C0, blue


def test_pass_at_k_chart_has_a_bar_per_arm(tmp_path):
    rows = {"base": {"mean": 0.1, "ci_low": 0.05, "ci_high": 0.15}, "mtp": {"mean": 0.2, "ci_low": 0.1, "ci_high": 0.3}}
    path = pass_at_k_chart(rows, "mbpp", tmp_path / "p.png")
    assert non_white_fraction(path) > 0.02
