"""`wmtp inspect weights` on every pipeline's micro-model run (training each for 2 steps is every
pipeline's smoke too), rendered by a real headless Chromium:
one shaded span per response token, a screenshot with shading in it; and the token alignment of the
page against a plain loop."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.pipelines import pipeline_config, write_pair_rollouts
from PIL import Image

from weighted_mtp.cli import main
from weighted_mtp.data import Batch, build_loader
from weighted_mtp.eval.weight_page import _solution, inspection_config, token_texts
from weighted_mtp.models.loading import load_model
from weighted_mtp.objectives import TokenWeights
from weighted_mtp.train.run import train

BROWSERS = ("chromium-headless-shell", "chromium", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip("no headless Chromium on PATH: `make setup` installs Debian's chromium-headless-shell as root")


def rendered(page: Path, screenshot: Path) -> str:
    """The DOM after Chromium has parsed and laid out the page, and a screenshot of it."""
    flags = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True)
    subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    return dom.stdout


def tinted_pixels(path: Path) -> int:
    """Pixels of a clear colour (red or blue shading), not white, black or grey text."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((pixels.max(axis=-1) - pixels.min(axis=-1)) > 30).sum())


def response_tokens(run_dir: Path, split: str, limit: int) -> int:
    """How many response tokens the first `limit` solutions have, counted from the data loader."""
    config = inspection_config(run_dir, split)
    _, tokenizer = load_model(run_dir / "final", models_dir=config.paths.models)
    total = rows = 0
    for batch in build_loader(config, tokenizer, split=split, shuffle=False):
        for labels in batch.labels[: limit - rows]:
            total += int((labels != -100).sum())
            rows += 1
        if rows == limit:
            break
    return total


@pytest.fixture
def runs(in_tmp_repo: Path, shared_data: Path, tmp_path: Path) -> dict[str, Path]:
    """A short run of every pipeline on the micro model, on rollouts with passing and failing solutions."""
    raw = write_pair_rollouts(in_tmp_repo / "raw", shared_data)
    models = tmp_path / "models"
    data = ["data.dataset=rollouts", "training.max_steps=2"]
    out = {}
    for recipe, extra in (
        ("baseline", ["data.sampler=correct_only"]),
        ("critic", ["data.sampler=pairs"]),
        ("verifiable", ["data.sampler=all"]),
        ("ref_tuning", ["data.sampler=correct_only"]),
        ("rho1", ["data.sampler=correct_only", "rho1.per_head=false"]),
        ("grad_norm", ["data.sampler=correct_only"]),
    ):
        out[recipe] = train(pipeline_config(recipe, raw, models, *data, *extra)).run_dir
    return out


def test_every_pipelines_page_shows_one_shaded_token_per_response_token(runs, tmp_path, capsys):
    limit = 6
    for recipe in ("baseline", "critic", "verifiable", "rho1", "grad_norm"):
        page = tmp_path / f"{recipe}.html"
        assert main(["inspect", "weights", "--run", str(runs[recipe]), "--limit", str(limit), "--out", str(page)]) == 0
        assert str(page) in capsys.readouterr().out
        dom = rendered(page, tmp_path / f"{recipe}.png")
        shaded = re.findall(r'<span class="tok" style="background:\s*([^";]+)', dom)
        assert len(shaded) == response_tokens(runs[recipe], "validation", limit) > 0, recipe
        assert "passes its tests" in dom and "fails its tests" in dom  # side by side
        image = Image.open(tmp_path / f"{recipe}.png")
        assert image.size == (1200, 1600) and len(np.unique(np.asarray(image.convert("L")))) > 2  # not blank
        if recipe == "baseline":
            assert {c.replace(" ", "") for c in shaded} == {"rgb(255,255,255)"}  # every weight is 1: white
        elif recipe == "rho1":  # top-k: a batch's selected tokens share one weight above 1 (red), the rest 0 (grey)
            colours = {c.replace(" ", "") for c in shaded}
            assert "#cfcfcf" in colours and all(re.fullmatch(r"rgb\(255,(\d+),\1\)", c) for c in colours - {"#cfcfcf"})
            assert tinted_pixels(tmp_path / f"{recipe}.png") > 500
        else:  # the critic's values, the verifiable and grad_norm weights vary from token to token
            assert len(set(shaded)) > 3 and tinted_pixels(tmp_path / f"{recipe}.png") > 500, recipe
    assert "head 2 weight" in (tmp_path / "verifiable.html").read_text()
    assert "advantage" in (tmp_path / "verifiable.html").read_text()
    assert "excess" in (tmp_path / "rho1.html").read_text()
    assert "grad_norm" in (tmp_path / "grad_norm.html").read_text()


def test_a_directory_that_is_not_a_finished_run_is_a_one_line_error(in_tmp_repo, tmp_path, capsys):
    assert main(["inspect", "weights", "--run", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


class CharTokenizer:
    """Token i is the character chr(97 + i % 26), enough to see where each token lands."""

    def decode(self, ids, skip_special: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def test_each_token_reads_head_ks_weight_at_k_before_it_and_its_details_one_before():
    torch.manual_seed(0)
    n_heads = 3
    input_ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 0, 0]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0]])
    labels = torch.full_like(input_ids, -100)
    labels[0, 4:9] = input_ids[0, 4:9]
    labels[0, 6] = -100  # a hole in the response
    labels[1, 3:7] = input_ids[1, 3:7]
    batch = Batch(input_ids, attention_mask, labels, torch.tensor([1.0, 0.0]), ["p", "p"])
    weights = torch.rand(2, 9, n_heads, dtype=torch.float64)
    value = torch.rand(2, 9, dtype=torch.float64)
    shaded = TokenWeights(weights, {"value": value})
    for row in range(2):
        solution = _solution(CharTokenizer(), batch, row, shaded, n_heads)
        response = [t for t in range(9) if labels[row, t] != -100]
        assert solution.tokens == [chr(97 + int(input_ids[row, t]) % 26) for t in response]
        assert solution.prompt == CharTokenizer().decode(
            [int(input_ids[row, t]) for t in range(9) if attention_mask[row, t] and labels[row, t] == -100]
        )
        for i, t in enumerate(response):
            for k in range(1, n_heads + 1):
                expected = float(weights[row, t - k, k - 1]) if t - k >= 0 else None
                assert solution.weights[i][k - 1] == expected
            assert solution.details["value"][i] == float(value[row, t - 1])
        assert solution.passed is (row == 0)


def test_token_texts_join_back_into_the_decoded_text():
    assert token_texts(CharTokenizer(), [0, 1, 2]) == ["a", "b", "c"]
