"""Self-speculative greedy decoding with the model's own MTP heads.

Blockwise parallel decoding (Stern et al. 2018) as Gloeckle et al. (2024, section 3.2, appendix A)
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

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from weighted_mtp.eval.generation import GeneratedIds, StopFn


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
    n_heads = n_heads or model.n_future_tokens
    if not 1 <= n_heads <= model.n_future_tokens:
        raise ValueError(f"n_heads must be in [1, {model.n_future_tokens}], got {n_heads}")
    if not prompt:
        raise ValueError("the prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    stop_ids = set(stop_ids)
    device = model.tok_embeddings.weight.device
    stats = SpeculativeStats(n_heads)
    cache = model.new_cache(1, len(prompt) + max_new_tokens + n_heads)

    prompt_tokens = torch.tensor([list(prompt)], device=device)
    next_token, *drafts = _greedy_per_head(model, prompt_tokens, n_heads, 0, cache, last_only=True)
    stats.forwards += 1
    position = len(prompt)  # where next_token goes
    generated: list[int] = []

    def finished(token: int) -> GeneratedIds | None:
        generated.append(token)
        stats.new_tokens += 1
        if token in stop_ids:
            return GeneratedIds(generated, "eos")
        if stop_when is not None and stop_when(0, generated):
            return GeneratedIds(generated, "stop")
        if len(generated) == max_new_tokens:
            return GeneratedIds(generated, "length")
        return None

    while True:
        if (result := finished(next_token)) is not None:
            return result, stats
        drafts = drafts[: max_new_tokens - len(generated) - 1]  # no point verifying past the budget
        block = torch.tensor([[next_token, *drafts]], device=device)
        verified, *drafted = _greedy_per_head(model, block, n_heads, position, cache, last_only=False)
        stats.forwards += 1
        n_accepted = 0
        while n_accepted < len(drafts) and drafts[n_accepted] == verified[n_accepted]:
            n_accepted += 1
        stats.record(len(drafts), n_accepted)
        for token in drafts[:n_accepted]:
            if (result := finished(token)) is not None:
                return result, stats
        # Every head saw the whole block; at the last accepted position head 1 gives the next token
        # and heads 2..n its drafts. Their cache entries past that position are rewritten next step.
        next_token = verified[n_accepted]
        drafts = [tokens[n_accepted] for tokens in drafted]
        position += n_accepted + 1
