"""Batched sampling with the KV cache: greedy, temperature, top-p, n samples, stop sequences.

Prompts of different lengths are left-padded into one batch; the padding is masked out as keys
(RoPE is relative, so a left-padded row computes the same logits as the row alone). Each row
samples from its own `torch.Generator`, seeded from (seed, prompt index, sample index), so a
sample does not depend on the batch it ran in, nor on `batch_size`. Rows that finish leave the
batch (their cache rows are dropped), so a long straggler does not drag finished rows along.

- `generate`: text in, `Completion`s out; `n_samples` per prompt, stop sequences checked on the
  decoded text, up to `batch_size` rows at a time (`length_batches`: fewer where prompts are long).
- `generate_ids`: token ids in and out, one batch; what `generate` and the rollout code build on.
- `sample_next`: the sampling rule alone (greedy, temperature, nucleus), for reuse and tests.
- `CompiledStep`: a decoding step compiled once per model and shape (`generate_ids(compiled=True)`).
- `speculative_generate_ids`: self-speculative greedy decoding, batch size 1; `generate` uses it
  when asked with `speculative=True` and `temperature == 0`; `compare_speculative` times it against
  plain greedy decoding on the same prompts.

Self-speculative greedy decoding with the model's own MTP heads: blockwise parallel decoding (Stern et al. 2018) as Gloeckle et al. (2024, section 3.2, appendix A)
apply it to multi-token prediction: at the last accepted position, head 1 gives the next token `g`
(certain: it is the greedy token) and heads 2..n draft the n - 1 tokens after it. One forward of the
trunk and every head over the block [g, draft_2, ..., draft_n] then does two things at once. Head 1's
greedy token at each block position is what plain greedy decoding would produce there, so the drafts
are accepted while they match it, and head 1's own token after the accepted prefix becomes the next
`g`. Heads 2..n at that same position give the next drafts: causal attention means their output there
depends on the accepted tokens only. Positions past the accepted prefix are never cleaned up in any
cache: the next block is written over them (`start_pos` rolls back), and attention never looks past
the block being computed.

Each step is thus one model call: the trunk and n heads over at most n tokens, and one unembedding
matmul for all heads and positions, whose argmax comes back in one `tolist`.

The output is token for token the output of plain greedy decoding (up to floating-point ties: the
block forward computes the same values with different matrix shapes). Batch size 1, greedy only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

FinishReason = Literal["stop", "eos", "length"]
# stop_when(row, generated_ids) -> True to end that row (e.g. a stop sequence appeared in its text)
StopFn = Callable[[int, list[int]], bool]

DEFAULT_BATCH_SIZE = 32
# A batch's left-padded prompt tokens (rows x its longest prompt) stay within this, past its first row.
DEFAULT_BATCH_TOKENS = 8192
# A compiled step's cache holds a power of two of positions, at least this many: few shapes, few compiles.
COMPILED_MIN_CACHE = 256


@dataclass
class GeneratedIds:
    """One row's new tokens (the token that ended it included) and why it ended."""

    token_ids: list[int]
    finish_reason: FinishReason


@dataclass
class Completion:
    """One sample for one prompt.

    `text` is the decoded completion, cut before the first stop sequence (special tokens skipped);
    `token_ids` are every token generated, the one that ended generation included; `finish_reason`
    is "stop" (a stop sequence), "eos" (a stop token such as EOS) or "length" (max_new_tokens).
    """

    text: str
    token_ids: list[int] = field(repr=False)
    finish_reason: FinishReason

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        return {"text": self.text, "n_tokens": self.n_tokens, "finish_reason": self.finish_reason}


# ----------------------------------------------------------------------------- sampling


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A generator seed for one (prompt, sample): independent of batching and of the other rows."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def nucleus_mask(sorted_probs: Tensor, top_p: float) -> Tensor:
    """For probabilities sorted in descending order: keep the smallest prefix whose mass reaches top_p.

    A token is kept when the mass strictly before it is below top_p, so the most likely token always is.
    """
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return mass_before < top_p


def sample_next(
    logits: Tensor, *, temperature: float, top_p: float = 1.0, generators: Sequence[torch.Generator] = ()
) -> Tensor:
    """Next token per row from logits [B, V]: argmax when temperature == 0, else nucleus sampling.

    Sampling inverts the cumulative distribution at one uniform draw per row from that row's own
    generator, which keeps a row's samples independent of the rest of the batch.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if len(generators) != logits.shape[0]:
        raise ValueError(f"sampling needs one generator per row: {len(generators)} for {logits.shape[0]} rows")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * nucleus_mask(probs, top_p)
    else:
        order = None  # inverting the CDF in vocabulary order is just as valid, and skips the sort
    cdf = probs.cumsum(dim=-1)
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(cdf.device)
    targets = (uniform * cdf[:, -1].double()).to(cdf.dtype)
    picks = torch.searchsorted(cdf, targets[:, None], right=True).clamp_max(cdf.shape[-1] - 1)
    return (order.gather(-1, picks) if order is not None else picks).squeeze(-1)


# ----------------------------------------------------------------------------- token ids


def _drop_rows(cache, keep: Tensor) -> None:
    """Keep only the rows `keep` of every K/V buffer (trunk, head 1 and extra heads)."""
    for layer in (*cache.layers, *cache.extra_heads):
        layer.k = layer.k.index_select(0, keep)
        layer.v = layer.v.index_select(0, keep)
    cache.batch_size = int(keep.numel())


class CompiledStep:
    """A model's one-token decoding step, compiled (gpt-fast's recipe: every shape fixed, so a step is
    one compiled graph). The weights are frozen into it and, in bf16 on a CPU with AMX, multiplied by
    the compiler's AMX kernels: SmolLM2-135M decodes at batch 1 about 1.6-1.7x faster than eagerly,
    at batch 8 only 1.03-1.2x (there the eager step's prepacked oneDNN products already do well).
    Compiling takes about a minute per batch size and cache length, and the weights must not change
    afterwards. Outputs equal the eager step's in float32; in bf16 the kernels round differently and
    a greedy decode can take another token where two are within rounding, so evaluation and
    rollouts, which must give eager decoding's tokens, do not use it."""

    def __init__(self, model) -> None:
        self.model = model
        self._compiled = torch.compile(self._decode, fullgraph=True, dynamic=False)

    def _decode(self, tokens: Tensor, position: Tensor, cache, mask: Tensor) -> Tensor:
        return self.model(tokens, start_pos=position, cache=cache, attention_mask=mask).logits[:, -1, 0]

    def __call__(self, tokens: Tensor, position: Tensor, cache, mask: Tensor) -> Tensor:
        # Inductor reads these settings where it compiles, which a new shape does on a later call.
        with torch._inductor.config.patch(freezing=True, max_autotune=True):
            return self._compiled(tokens, position, cache, mask)


def compiled_step(model) -> CompiledStep:
    """The model's `CompiledStep`, made on first use and kept with the model."""
    if "_compiled_step" not in model.__dict__:
        model.__dict__["_compiled_step"] = CompiledStep(model)
    return model.__dict__["_compiled_step"]


@torch.inference_mode()
def generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Collection[int] = (),
    stop_when: StopFn | None = None,
    seeds: Sequence[int] | None = None,
    seed: int = 0,
    pad_id: int = 0,
    compiled: bool = False,
) -> list[GeneratedIds]:
    """Continue every prompt (one row each, all in one batch) by up to `max_new_tokens` tokens.

    A row ends at a token in `stop_ids` ("eos"), when `stop_when(row, ids)` says so ("stop"), or at
    `max_new_tokens` ("length"). `seeds` gives each row's generator seed (default: derived from
    `seed` and the row index); unused when greedy. Every prompt needs at least one token.
    `compiled` decodes with `compiled_step`: the cache is sized to a power of two and finished rows
    stay in the batch (their tokens are dropped), so that every step has the same shapes.
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if not prompts:
        return []
    device = model.tok_embeddings.weight.device
    n_rows, longest = len(prompts), max(len(p) for p in prompts)
    seeds = list(seeds) if seeds is not None else [row_seed(seed, row, 0) for row in range(n_rows)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    stop_ids = set(stop_ids)

    cache_len = longest + max_new_tokens
    if compiled:
        cache_len = max(COMPILED_MIN_CACHE, 1 << (cache_len - 1).bit_length())
    tokens = torch.full((n_rows, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.ones((n_rows, cache_len), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, : longest - len(prompt)] = 0
    padded = bool((mask == 0).any())

    results: list[GeneratedIds | None] = [None] * n_rows
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    active = list(range(n_rows))  # original row of each batch row
    cache = model.new_cache(n_rows, cache_len)
    step_compiled = compiled_step(model) if compiled else None
    logits = model(
        tokens, cache=cache, attention_mask=mask if padded else None, last_position_only=True
    ).logits[:, -1, 0]
    position = longest
    for step in range(max_new_tokens):
        next_tokens = sample_next(
            logits, temperature=temperature, top_p=top_p, generators=[generators[r] for r in active]
        )
        still_running: list[int] = []
        for batch_row, (row, token) in enumerate(zip(active, next_tokens.tolist())):
            if results[row] is not None:  # compiled: a finished row decodes on, unread
                continue
            generated[row].append(token)
            if token in stop_ids:
                results[row] = GeneratedIds(generated[row], "eos")
            elif stop_when is not None and stop_when(row, generated[row]):
                results[row] = GeneratedIds(generated[row], "stop")
            elif step + 1 == max_new_tokens:
                results[row] = GeneratedIds(generated[row], "length")
            else:
                still_running.append(batch_row)
        if not still_running:
            break
        if step_compiled is not None:
            logits = step_compiled(next_tokens[:, None], torch.tensor(position, device=device), cache, mask)
            position += 1
            continue
        if len(still_running) < len(active):
            keep = torch.tensor(still_running, device=device)
            _drop_rows(cache, keep)
            mask, next_tokens = mask.index_select(0, keep), next_tokens.index_select(0, keep)
            active = [active[i] for i in still_running]
            padded = bool((mask == 0).any())
        logits = model(
            next_tokens[:, None], start_pos=position, cache=cache, attention_mask=mask if padded else None
        ).logits[:, -1, 0]
        position += 1
    return [r for r in results if r is not None]


# ----------------------------------------------------------------------------- text


# ----------------------------------------------------------------------------- self-speculative decoding


@dataclass
class SpeculativeStats:
    """Counters over one or more decodes.

    `drafted[i]` counts the verifications that checked head i+2's draft; `accepted[i]` those in which
    it was accepted, which needs every earlier draft of the block accepted too. So
    tokens per verification = 1 + sum(accepted) / verifications.
    """

    n_heads: int
    forwards: int = 0  # model calls (the prompt's prefill included); plain greedy makes one per token
    new_tokens: int = 0
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.drafted = self.drafted or [0] * (self.n_heads - 1)
        self.accepted = self.accepted or [0] * (self.n_heads - 1)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forwards if self.forwards else 0.0

    @property
    def acceptance_rates(self) -> list[float]:
        """Per draft head (heads 2..n): the fraction of its drafts that were accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    def record(self, n_drafts: int, n_accepted: int) -> None:
        for i in range(n_drafts):
            self.drafted[i] += 1
            self.accepted[i] += i < n_accepted

    def add(self, other: SpeculativeStats) -> None:
        self.forwards += other.forwards
        self.new_tokens += other.new_tokens
        self.drafted = [a + b for a, b in zip(self.drafted, other.drafted)]
        self.accepted = [a + b for a, b in zip(self.accepted, other.accepted)]

    def to_dict(self) -> dict:
        return {"n_heads": self.n_heads, "forwards": self.forwards, "new_tokens": self.new_tokens,
                "tokens_per_forward": self.tokens_per_forward, "acceptance_rates": self.acceptance_rates}


def _greedy_per_head(model, tokens: Tensor, n_heads: int, start_pos: int, cache, *, last_only: bool) -> list:
    """One forward of the trunk and heads 1..n_heads over tokens [1, T], writing every cache.

    Returns each head's greedy token at each position ([n_heads][T]), or at the last position only
    ([n_heads]). All heads' rows go through the shared norm and unembedding in one matmul, so the
    unembedding's weights are read once per step, and one `tolist` brings every token back at once.
    """
    h_trunk = model.trunk_forward(tokens, start_pos=start_pos, cache=cache)
    hidden = torch.cat([model.head_forward(k, h_trunk, start_pos=start_pos, cache=cache) for k in range(n_heads)])
    if last_only:
        hidden = hidden[:, -1]
    return model.logits(hidden).argmax(dim=-1).tolist()


class _Continuation:
    """The tokens a speculative decode has accepted so far, ending like `generate_ids`: at a token in
    `stop_ids` ("eos"), when `stop_when(0, ids)` says so ("stop"), or at `max_new_tokens` ("length")."""

    def __init__(self, max_new_tokens: int, stop_ids: Collection[int], stop_when: StopFn | None,
                 stats: SpeculativeStats) -> None:
        self.max_new_tokens, self.stop_ids, self.stop_when, self.stats = max_new_tokens, set(stop_ids), stop_when, stats
        self.tokens: list[int] = []

    def add(self, token: int) -> GeneratedIds | None:
        """Accept `token`; the result when that ends the decode."""
        self.tokens.append(token)
        self.stats.new_tokens += 1
        if token in self.stop_ids:
            return GeneratedIds(self.tokens, "eos")
        if self.stop_when is not None and self.stop_when(0, self.tokens):
            return GeneratedIds(self.tokens, "stop")
        if len(self.tokens) == self.max_new_tokens:
            return GeneratedIds(self.tokens, "length")
        return None

    @property
    def budget(self) -> int:
        """How many more tokens may come after the next one."""
        return self.max_new_tokens - len(self.tokens) - 1


def _check_speculative(model, prompt: Sequence[int], max_new_tokens: int, n_heads: int | None) -> int:
    """The number of heads to use (default: all the model has), after checking the arguments."""
    n_heads = n_heads or model.n_future_tokens
    if not 1 <= n_heads <= model.n_future_tokens:
        raise ValueError(f"n_heads must be in [1, {model.n_future_tokens}], got {n_heads}")
    if not prompt:
        raise ValueError("the prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    return n_heads


@torch.inference_mode()
def speculative_generate_ids(
    model,
    prompt: Sequence[int],
    *,
    max_new_tokens: int = 256,
    stop_ids: Collection[int] = (),
    stop_when: StopFn | None = None,
    n_heads: int | None = None,
) -> tuple[GeneratedIds, SpeculativeStats]:
    """Greedy continuation of one prompt, drafting with heads 2..n_heads (default: all the model has).

    Ends like `generate_ids`: a token in `stop_ids` ("eos"), `stop_when(0, ids)` ("stop"), or
    `max_new_tokens` ("length"); returns the new tokens and the decode's counters.
    """
    n_heads = _check_speculative(model, prompt, max_new_tokens, n_heads)
    device = model.tok_embeddings.weight.device
    stats = SpeculativeStats(n_heads)
    out = _Continuation(max_new_tokens, stop_ids, stop_when, stats)
    cache = model.new_cache(1, len(prompt) + max_new_tokens + n_heads)

    prompt_tokens = torch.tensor([list(prompt)], device=device)
    next_token, *drafts = _greedy_per_head(model, prompt_tokens, n_heads, 0, cache, last_only=True)
    stats.forwards += 1
    position = len(prompt)  # where next_token goes

    while True:
        if (result := out.add(next_token)) is not None:
            return result, stats
        drafts = drafts[: out.budget]  # no point verifying past the budget
        block = torch.tensor([[next_token, *drafts]], device=device)
        verified, *drafted = _greedy_per_head(model, block, n_heads, position, cache, last_only=False)
        stats.forwards += 1
        n_accepted = 0
        while n_accepted < len(drafts) and drafts[n_accepted] == verified[n_accepted]:
            n_accepted += 1
        stats.record(len(drafts), n_accepted)
        for token in drafts[:n_accepted]:
            if (result := out.add(token)) is not None:
                return result, stats
        # Every head saw the whole block; at the last accepted position head 1 gives the next token
        # and heads 2..n its drafts. Their cache entries past that position are rewritten next step.
        next_token = verified[n_accepted]
        drafts = [tokens[n_accepted] for tokens in drafted]
        position += n_accepted + 1


@dataclass
class SpeculativeComparison:
    """Plain and self-speculative greedy decoding of the same prompts, timed side by side."""

    stats: SpeculativeStats
    prompts: int
    plain_s: float
    speculative_s: float
    outputs_differing: int  # 0 unless floating-point ties broke differently

    @property
    def speedup(self) -> float:
        return self.plain_s / self.speculative_s if self.speculative_s else 0.0

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "n_heads": self.stats.n_heads,
                "acceptance_per_head": self.stats.acceptance_rates, "tokens_per_forward": self.stats.tokens_per_forward,
                "speedup": self.speedup, "plain_s": self.plain_s, "speculative_s": self.speculative_s,
                "new_tokens": self.stats.new_tokens, "outputs_differing": self.outputs_differing}


def compare_speculative(
    model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Collection[int] = ()
) -> SpeculativeComparison:
    """Each prompt decoded greedily at batch 1, plainly then speculatively with all the model's heads,
    prompt by prompt (so a shared machine's load hits both alike): the time of each, the acceptance
    counters, and how many outputs differ."""
    stats = SpeculativeStats(model.n_future_tokens)
    plain_s = speculative_s = 0.0
    differing = 0
    for ids in prompts:
        began = time.perf_counter()
        (plain,) = generate_ids(model, [ids], max_new_tokens=max_new_tokens, stop_ids=stop_ids)
        plain_s += time.perf_counter() - began
        began = time.perf_counter()
        drafted, one = speculative_generate_ids(model, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
        speculative_s += time.perf_counter() - began
        stats.add(one)
        differing += drafted.token_ids != plain.token_ids
    return SpeculativeComparison(stats, len(prompts), plain_s, speculative_s, differing)


def sampling_distribution(logits: Tensor, *, temperature: float, top_p: float = 1.0) -> Tensor:
    """The distribution `sample_next` draws from: softmax(logits / temperature) restricted to the
    nucleus (the smallest most likely set whose mass reaches top_p) and renormalised, in float32."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(dim=-1, descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, nucleus_mask(ordered, top_p))
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _distributions_per_head(model, tokens: Tensor, n_heads: int, start_pos: int, cache, *, temperature: float,
                            top_p: float) -> Tensor:
    """One forward of the trunk and heads 1..n_heads over tokens [1, T]: [n_heads, T, V] sampling
    distributions (head k at position t: the token t+k)."""
    h_trunk = model.trunk_forward(tokens, start_pos=start_pos, cache=cache)
    hidden = torch.cat([model.head_forward(k, h_trunk, start_pos=start_pos, cache=cache) for k in range(n_heads)])
    return sampling_distribution(model.logits(hidden), temperature=temperature, top_p=top_p)


def _draw(probs: Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.inference_mode()
def speculative_sample_ids(
    model,
    prompt: Sequence[int],
    *,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    stop_ids: Collection[int] = (),
    stop_when: StopFn | None = None,
    n_heads: int | None = None,
    seed: int = 0,
) -> tuple[GeneratedIds, SpeculativeStats]:
    """Sampling at `temperature` (and `top_p`) that drafts with heads 2..n and keeps the model's own
    distribution exactly (Leviathan et al. 2023; Chen et al. 2023): head k at the last accepted
    position proposes token d_k ~ q_k; one forward of the block gives head 1's distribution p at each
    position; d_k is accepted with probability min(1, p(d_k) / q_k(d_k)), and the first rejected one
    is replaced by a draw from max(0, p - q_k) renormalised; when every draft is accepted, head 1 at
    the last position gives one more token. Every token is thus distributed as plain sampling's
    (`generate_ids` with the same temperature and top_p), though the draws differ.
    """
    if temperature <= 0:
        raise ValueError("speculative sampling needs temperature > 0 (greedy: speculative_generate_ids)")
    n_heads = _check_speculative(model, prompt, max_new_tokens, n_heads)
    device = model.tok_embeddings.weight.device
    generator = torch.Generator().manual_seed(seed)
    stats = SpeculativeStats(n_heads)
    out = _Continuation(max_new_tokens, stop_ids, stop_when, stats)
    cache = model.new_cache(1, len(prompt) + max_new_tokens + n_heads)
    sample = dict(temperature=temperature, top_p=top_p)

    heads = _distributions_per_head(model, torch.tensor([list(prompt)], device=device), n_heads, 0, cache,
                                    **sample)[:, -1]  # [n_heads, V] at the prompt's last position
    stats.forwards += 1
    next_token = _draw(heads[0], generator)
    position = len(prompt)  # where next_token goes

    while True:
        if (result := out.add(next_token)) is not None:
            return result, stats
        proposals = heads[1 : 1 + max(0, min(n_heads - 1, out.budget))]
        drafts = [_draw(q, generator) for q in proposals]
        block = torch.tensor([[next_token, *drafts]], device=device)
        verified = _distributions_per_head(model, block, n_heads, position, cache, **sample)  # [n, 1+d, V]
        stats.forwards += 1
        n_accepted, replacement = 0, None
        for i, (draft, q) in enumerate(zip(drafts, proposals)):
            p = verified[0, i]
            if float(torch.rand(1, generator=generator, dtype=torch.float64)) * float(q[draft]) < float(p[draft]):
                n_accepted += 1
                continue
            residual = (p - q).clamp_min(0)
            replacement = _draw(residual / residual.sum(), generator)
            break
        stats.record(len(drafts), n_accepted)
        for token in drafts[:n_accepted]:
            if (result := out.add(token)) is not None:
                return result, stats
        # the next token: the rejected draft's replacement, or head 1's own draw after the last draft
        next_token = replacement if replacement is not None else _draw(verified[0, n_accepted], generator)
        heads = verified[:, n_accepted]
        position += n_accepted + 1


# ----------------------------------------------------------------------------- text in, text out


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop sequence starts in text, or None."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[slice]:
    """Consecutive batches of rows sorted longest prompt first: at most `batch_size` rows each, and,
    past a batch's first row, at most `max_tokens` of left-padded prompt (rows x the batch's longest).
    MBPP test's one 3,733-token chat prompt padded its batch of 32 to 119,456 prompt tokens for
    14,498 real ones; with 8,192 it shares its batch with one other prompt."""
    batches, start = [], 0
    while start < len(lengths):
        rows = max(1, min(batch_size, max_tokens // max(1, lengths[start])))
        batches.append(slice(start, min(start + rows, len(lengths))))
        start += rows
    return batches


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    seed: int = 0,
    batch_size: int | None = None,
    add_bos: bool = False,
    speculative: bool = False,
    prompt_keys: Sequence[int] | None = None,
) -> list[list[Completion]]:
    """`n_samples` completions per prompt: result[i][j] is sample j of prompts[i].

    Greedy when temperature == 0 (then the n samples are one decode, repeated). A sample ends at the
    tokenizer's stop tokens (EOS and end-of-turn), at any string of `stop` in its decoded text (the
    text is cut before it), or after `max_new_tokens`. Rows run up to `batch_size` at a time (default
    32; fewer where prompts are long, see `length_batches`), longest prompts first; results do not
    depend on the batch size. `speculative=True` decodes greedy samples one prompt at a time with the
    model's own MTP heads (same tokens, fewer forwards).
    Sample j of prompt i is seeded by (seed, prompt_keys[i], j); `prompt_keys` defaults to the
    positions, and a caller that generates a long list in pieces passes each prompt's place in it.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    stop = [s for s in stop if s]
    encoded = tokenizer.encode_batch(prompts, add_bos=add_bos)
    keys = list(prompt_keys) if prompt_keys is not None else list(range(len(prompts)))
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} prompt_keys for {len(prompts)} prompts")
    distinct = 1 if temperature == 0 else n_samples
    rows = [(i, j) for i in range(len(prompts)) for j in range(distinct)]
    rows.sort(key=lambda row: -len(encoded[row[0]]))
    batch_size = batch_size or DEFAULT_BATCH_SIZE

    def stop_in_text(ids: list[int]) -> bool:
        return _first_stop(tokenizer.decode(ids), stop) is not None

    outputs: dict[tuple[int, int], GeneratedIds] = {}
    if speculative and temperature == 0 and model.n_future_tokens > 1:
        for prompt_index, sample_index in rows:
            outputs[prompt_index, sample_index], _ = speculative_generate_ids(
                model, encoded[prompt_index], max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids,
                stop_when=(lambda _row, ids: stop_in_text(ids)) if stop else None,
            )
    else:
        for rows_of_batch in length_batches([len(encoded[i]) for i, _ in rows], batch_size, DEFAULT_BATCH_TOKENS):
            batch = rows[rows_of_batch]
            generated = generate_ids(
                model, [encoded[i] for i, _ in batch], max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, stop_ids=tokenizer.stop_ids, seeds=[row_seed(seed, keys[i], j) for i, j in batch],
                stop_when=(lambda _row, ids: stop_in_text(ids)) if stop else None, pad_id=tokenizer.pad_id,
            )
            outputs.update(zip(batch, generated))

    completions: list[list[Completion]] = []
    for i in range(len(prompts)):
        samples = []
        for j in range(n_samples):
            result = outputs[i, j if distinct > 1 else 0]
            text = tokenizer.decode(result.token_ids)
            cut = _first_stop(text, stop)
            samples.append(Completion(text if cut is None else text[:cut], list(result.token_ids), result.finish_reason))
        completions.append(samples)
    return completions
