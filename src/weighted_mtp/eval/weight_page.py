"""`wmtp inspect weights`: one self-contained HTML page showing what a run's objective weighs.

Held-out solutions (passing and failing ones of the same problem side by side) with each response
token shaded by the loss weight the run's objective gives it: white is 1 (the uniform baseline),
red heavier, blue lighter, grey 0 (skipped). Hovering a token shows its weight for every head and
what the weight came from (the critic's value and advantage, Rho-1's excess loss). A critic run
(stage 1) trains no language-model head and is shaded by its value instead.

Token t is judged where head 1 predicts it, at position t-1: its head-1 weight, value (the state
before it), advantage and excess all sit there; head k's weight for it sits at t-k.
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weighted_mtp.config import load_saved_config
from weighted_mtp.config.schema import Config
from weighted_mtp.errors import CheckpointError, ConfigError
from weighted_mtp.io import atomic_write_text

log = logging.getLogger(__name__)

SHADINGS = ("weight", "value", "advantage", "excess", "grad_norm")


@dataclass
class ShadedSolution:
    """One held-out solution, its response cut into tokens, with what the objective made of each."""

    problem_id: str
    passed: bool
    prompt: str
    tokens: list[str]  # the response's tokens, as text
    weights: list[list[float | None]] | None  # per token, per head (None where a head has no target)
    details: dict[str, list[float]] = field(default_factory=dict)  # per token: value, advantage, excess


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, as the difference between decoding the tokens up to it and up to the one
    before (a token that ends inside a multi-byte character shows where the character completes)."""
    texts, previous = [], ""
    for end in range(1, len(ids) + 1):
        current = tokenizer.decode(ids[:end])
        texts.append(current[len(previous):] if current.startswith(previous) else tokenizer.decode(ids[end - 1:end]))
        previous = current
    return texts


def inspection_config(run_dir: Path, split: str) -> Config:
    """The run's saved config, reading every solution of the split once, in order, one per row."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(f"--run {run_dir}: no config.yaml there (the directory of a `wmtp train` run)")
    if not (run_dir / "final" / "config.json").is_file():
        raise CheckpointError(f"--run {run_dir}: no exported model in {run_dir / 'final'}; finish the run first")
    config = load_saved_config(saved)
    data = config.data.model_copy(update={"sampler": "all", "n_samples": None, "pack": False, "num_workers": 0})
    return config.model_copy(update={"data": data})


def shaded_solutions(run_dir: Path, *, split: str = "validation", limit: int = 16,
                     device: str = "cpu") -> tuple[Config, list[ShadedSolution]]:
    """The first `limit` solutions of `split` (in the dataset's order: a problem's solutions
    together, passing first), with the token weights the run's final model and objective give."""
    from safetensors.torch import load_file

    from weighted_mtp.data import build_loader
    from weighted_mtp.models.loading import load_model
    from weighted_mtp.objectives import build_objective

    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    config = inspection_config(run_dir, split)
    final = run_dir / "final"
    model, tokenizer = load_model(final, models_dir=config.paths.models, device=device, seed=config.seed)
    model.eval()
    objective = build_objective(config, model, torch.device(device))
    for name, module in objective.trainable_modules().items():  # a value head trained beside the model
        path = final / f"{name}.safetensors"
        if path.is_file():
            module.load_state_dict(load_file(path))
        module.to(device).eval()
    for frozen in objective.frozen_modules().values():  # Rho-1's reference
        frozen.module.to(device)
    loader = build_loader(config, tokenizer, split=split, shuffle=False)
    solutions: list[ShadedSolution] = []
    for batch in loader:
        batch = batch.to(device)
        shaded = objective.token_weights(model, batch)
        for row in range(len(batch)):
            solutions.append(_solution(tokenizer, batch, row, shaded, model.n_future_tokens))
            if len(solutions) == limit:
                return config, solutions
    return config, solutions


def _solution(tokenizer, batch, row: int, shaded, n_heads: int) -> ShadedSolution:
    labels = batch.labels[row]
    real = batch.attention_mask[row].bool()
    response = torch.nonzero(labels != -100).flatten().tolist()
    prompt_ids = batch.input_ids[row][real & (labels == -100)].tolist()
    response_ids = [int(labels[t]) for t in response]
    weights = None
    if shaded.weights is not None:
        w = shaded.weights[row].double().cpu()
        weights = [[float(w[t - k, k - 1]) if t - k >= 0 else None for k in range(1, n_heads + 1)] for t in response]
    details = {name: [float(values[row, t - 1]) for t in response] for name, values in shaded.details.items()}
    return ShadedSolution(batch.problem_ids[row], bool(batch.rewards[row] > 0.5), tokenizer.decode(prompt_ids),
                          token_texts(tokenizer, response_ids), weights, details)


# ----------------------------------------------------------------------------- the page


def shade_amounts(solutions: list[ShadedSolution], shading: str, head: int) -> list[list[float | None]]:
    """Per token, a number in [-1, 1] (negative blue, positive red) or None (grey: weight 0 or no
    target). Weights on a log2 scale (0.25 .. 4), values around 0.5, advantages and excess losses
    over the 95th percentile of their magnitude on the page."""
    if shading == "weight":
        out = []
        for s in solutions:
            row = []
            for per_head in s.weights or []:
                w = per_head[head - 1]
                row.append(None if w is None or w <= 0 else max(-1.0, min(1.0, math.log2(w) / 2)))
            out.append(row)
        return out
    if shading == "value":
        return [[max(-1.0, min(1.0, 2 * (v - 0.5))) for v in s.details["value"]] for s in solutions]
    magnitudes = sorted(abs(v) for s in solutions for v in s.details[shading])
    scale = magnitudes[int(0.95 * (len(magnitudes) - 1))] if magnitudes else 1.0
    scale = scale or 1.0
    return [[max(-1.0, min(1.0, v / scale)) for v in s.details[shading]] for s in solutions]


def colour(amount: float | None) -> str:
    if amount is None:
        return "#cfcfcf"
    fade = round(200 * abs(amount))
    return f"rgb(255,{255 - fade},{255 - fade})" if amount >= 0 else f"rgb({255 - fade},{255 - fade},255)"


def _tooltip(solution: ShadedSolution, i: int) -> str:
    parts = []
    if solution.weights is not None:
        parts += [f"head {k + 1} weight {w:.3f}" if w is not None else f"head {k + 1}: no target"
                  for k, w in enumerate(solution.weights[i])]
    parts += [f"{name} {values[i]:+.3f}" for name, values in solution.details.items()]
    return "; ".join(parts)


def _summary(solutions: list[ShadedSolution], head: int) -> list[str]:
    lines = []
    for label, passed in (("passing", True), ("failing", False)):
        group = [s for s in solutions if s.passed == passed]
        weights = [t[head - 1] for s in group for t in (s.weights or []) if t[head - 1] is not None]
        tokens = sum(len(s.tokens) for s in group)
        text = f"{label}: {len(group)} solutions, {tokens} tokens"
        if weights:
            zero = sum(w == 0 for w in weights) / len(weights)
            text += f"; head {head} weight mean {sum(weights) / len(weights):.3f}, zero on {100 * zero:.0f}%"
        for name in group[0].details if group else ():
            values = [v for s in group for v in s.details[name]]
            text += f"; mean {name} {sum(values) / len(values):+.3f}"
        lines.append(f"<li>{html.escape(text)}</li>")
    return lines


def render_weight_page(config: Config, solutions: list[ShadedSolution], *, run_dir: Path, split: str,
                       shading: str = "weight", head: int = 1) -> str:
    """The page as one HTML string, no scripts or outside resources: every token a `span.tok`."""
    if shading == "weight" and solutions and solutions[0].weights is None:
        shading = "value"  # a critic run: no weights to shade by
    available = {"weight"} if solutions and solutions[0].weights is not None else set()
    available |= set(solutions[0].details) if solutions else set()
    if solutions and shading not in available:
        raise ConfigError(f"--shade {shading}: this run's objective gives {', '.join(sorted(available))}")
    amounts = shade_amounts(solutions, shading, head)
    title = f"{config.experiment.name} ({config.experiment.pipeline}): token {shading}s on {split}"
    legend = {
        "weight": f"head {head}'s loss weight: white 1, red up to 4 and more, blue down to 1/4 and less, grey 0",
        "value": "the critic's value before the token: white 0.5, red towards 1 (pass), blue towards 0 (fail)",
        "advantage": "the advantage of emitting the token: red positive, blue negative",
        "excess": "the model's loss minus the reference's: red above, blue below",
        "grad_norm": "head 1's loss-gradient norm: red above the page's typical size",
    }[shading]
    out = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;} .problem{margin:1.5em 0;border-top:1px solid #999;}"
        " .pair{display:grid;grid-template-columns:1fr 1fr;gap:1em;} .solution{border:1px solid #ccc;padding:.5em;}"
        " .code{font-family:monospace;white-space:pre-wrap;font-size:13px;line-height:1.5;}"
        " .tok:hover{outline:1px solid #000;} details{color:#555;font-size:12px;}"
        " .pass{color:#070;} .fail{color:#a00;}</style>",
        "</head><body>", f"<h1>{html.escape(title)}</h1>",
        f"<p>Run <code>{html.escape(str(run_dir))}</code>, model <code>{html.escape(str(run_dir / 'final'))}</code>. "
        f"Shading: {html.escape(legend)}. Hover a token for every head's weight and what it came from.</p>",
        "<ul>", *_summary(solutions, head), "</ul>",
    ]
    order: dict[str, list[int]] = {}
    for i, solution in enumerate(solutions):
        order.setdefault(solution.problem_id, []).append(i)
    for problem_id, members in order.items():
        out += [f"<div class='problem'><h2>{html.escape(problem_id)}</h2>",
                f"<details><summary>prompt</summary><div class='code'>{html.escape(solutions[members[0]].prompt)}"
                "</div></details>", "<div class='pair'>"]
        for passed in (True, False):
            out.append("<div>")
            for i in (m for m in members if solutions[m].passed == passed):
                solution = solutions[i]
                tokens = "".join(  # on one line: the code's own whitespace is in its tokens
                    f"<span class='tok' style='background:{colour(amounts[i][t])}' "
                    f"title='{html.escape(_tooltip(solution, t), quote=True)}'>{html.escape(text)}</span>"
                    for t, text in enumerate(solution.tokens)
                )
                out.append(f"<div class='solution'><div class='{'pass' if passed else 'fail'}'>"
                           f"{'passes' if passed else 'fails'} its tests</div><div class='code'>{tokens}</div></div>")
            out.append("</div>")
        out += ["</div></div>"]
    out.append("</body></html>")
    return "\n".join(out)


def write_weight_page(run_dir: Path, *, split: str = "validation", limit: int = 16, shading: str = "weight",
                      head: int = 1, out: Path | None = None, device: str = "cpu") -> Path:
    if shading not in SHADINGS:
        raise ConfigError(f"--shade: unknown {shading!r} (known: {', '.join(SHADINGS)})")
    if head < 1:
        raise ConfigError(f"--head must be at least 1, got {head}")
    config, solutions = shaded_solutions(run_dir, split=split, limit=limit, device=device)
    if not 1 <= head <= config.model.n_future_tokens:
        raise ConfigError(f"--head {head}: the run's model has heads 1..{config.model.n_future_tokens}")
    out = out if out is not None else run_dir / f"weights-{split}.html"
    atomic_write_text(out, render_weight_page(config, solutions, run_dir=run_dir, split=split, shading=shading,
                                              head=head))
    log.info("wrote %s: %d solutions of %s", out, len(solutions), split)
    return out
