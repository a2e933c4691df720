"""The weighted multi-token prediction loss, computed without materialising n x vocab logits.

Two ideas keep peak memory at one head's worth (Gloeckle et al. 2024, section 3):

1. Head by head: run the trunk once, then for each head run its block, its loss and its backward
   into a *detached* copy of the trunk output, so that only one head's activations are alive at a
   time; finally one backward through the trunk with the gradient the heads accumulated.
2. Chunked cross-entropy: the unembedding and the loss are computed over `chunk_size` positions at a
   time, so at most `chunk_size x vocab` logits are ever alive. `chunked_cross_entropy` is the
   general per-token form (recomputes the logits in the backward pass); inside the MTP loss, where
   the token weights are known before the forward pass, each chunk's gradient is computed right after
   its loss instead (`_FusedWeightedCrossEntropy`), which saves the recomputation.

`mtp_loss_naive` is the plain reference (all logits, autograd through everything); the tests hold
the two to 1e-5 in the loss and in every parameter's gradient.

Label convention: `labels` is aligned with `input_ids` ([B, T], -100 = no loss). Head k (1-based) at
position t predicts labels[:, t + k]; targets beyond the sequence or equal to -100 contribute nothing.
Weights are constants (no gradient flows into whatever produced them). An objective whose weights
depend on the model's own per-token losses (Rho-1) computes them first with `head_token_ce` and
passes the resulting tensor.

Normalisation: head k's loss is divided by its number of targets, by default those of the call's
own batch. A training step that spans several calls (micro-batches, ranks) passes `target_counts`,
the counts over the whole step (`head_target_counts` summed): each call then returns and
backpropagates its share of the global batch's loss, and the shares add up to the loss of the
whole batch in one call, however the batch was split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


@dataclass
class MTPLossOutput:
    """Detached results of one call. With `target_counts`, the means are this call's shares of the
    step's means (sum(...) / target_counts[k]): adding them over the step's calls gives the means."""

    loss: Tensor  # scalar, detached: the total objective, trunk_loss included
    head_losses: Tensor  # [n] weighted mean CE per head
    head_ce: Tensor  # [n] unweighted mean CE per head
    head_accuracy: Tensor  # [n] top-1 accuracy per head over unmasked targets
    head_tokens: Tensor  # [n] number of unmasked targets per head (in this call)
    aux_loss: Tensor | None  # the trunk loss, detached

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat floats for a tracker: loss, aux_loss and per-head loss/ce/accuracy/tokens."""
        out = {f"{prefix}loss": self.loss.item()}
        if self.aux_loss is not None:
            out[f"{prefix}aux_loss"] = self.aux_loss.item()
        for k in range(self.head_losses.numel()):
            out[f"{prefix}head{k + 1}/loss"] = self.head_losses[k].item()
            out[f"{prefix}head{k + 1}/ce"] = self.head_ce[k].item()
            out[f"{prefix}head{k + 1}/accuracy"] = self.head_accuracy[k].item()
            out[f"{prefix}head{k + 1}/tokens"] = float(self.head_tokens[k].item())
        return out


# --------------------------------------------------------------------------- chunked cross-entropy


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits and softmax in at least fp32 (fp64 stays fp64, for tight tests)."""
    return torch.promote_types(dtype, torch.float32)


# On CPU a chunk's softmax arithmetic runs over row blocks of about this many bytes of fp32 logits,
# which stay in cache across its passes (cast, max, exp, sum, divide, scale) instead of streaming the
# whole chunk (hundreds of MB) through memory for each: a SmolLM2 bf16 chunk of 1024 rows, with its
# three matrix products, measured 1.5x faster (fp32 1.03x). A GPU takes the chunk in one block.
CPU_BLOCK_BYTES = 4 * 2**20


def _row_blocks(logits: Tensor) -> list[slice]:
    """Row slices of a chunk of logits [c, V]: cache-sized blocks on CPU, the whole chunk elsewhere."""
    rows, vocab = logits.shape
    step = max(1, CPU_BLOCK_BYTES // (4 * vocab)) if logits.device.type == "cpu" else max(rows, 1)
    return [slice(start, start + step) for start in range(0, rows, step)]


def _chunk_stats_(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cross-entropy, argmax correctness, logsumexp and softmax of a block of logits [c, V].

    Overwrites `logits` with the softmax, so a block costs one c x V buffer, not two.
    """
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    row_max, argmax = logits.max(dim=-1, keepdim=True)  # one pass for both (the first index on ties)
    correct = argmax.squeeze(1) == targets
    probs = logits.sub_(row_max).exp_()
    sum_exp = probs.sum(dim=-1, keepdim=True)
    lse = (sum_exp.log() + row_max).squeeze(1)
    return lse - target_logit, correct, lse, probs.div_(sum_exp)


def _chunk_losses_(logits: Tensor, targets: Tensor, coef: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy, argmax correctness and logsumexp of each row of a chunk of logits [c, V] in the
    model's dtype, computed in at least fp32, block by block (`_row_blocks`). With `coef`, overwrites
    `logits` with coef * (softmax - onehot(target)), the weighted loss's gradient wrt them, in their
    own dtype (the dtype the matrix products of the backward take)."""
    acc_dtype = _compute_dtype(logits.dtype)
    rows = logits.shape[0]
    ce = torch.empty(rows, dtype=acc_dtype, device=logits.device)
    lse = torch.empty(rows, dtype=acc_dtype, device=logits.device)
    correct = torch.empty(rows, dtype=torch.bool, device=logits.device)
    for block in _row_blocks(logits):
        values = logits[block].to(acc_dtype)  # a view, written in place, when already in acc_dtype
        ce[block], correct[block], lse[block], probs = _chunk_stats_(values, targets[block])
        if coef is not None:
            grad = _ce_grad_logits_(probs, targets[block], coef[block])
            if logits.dtype != acc_dtype:
                logits[block] = grad
    return ce, correct, lse


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` against targets that are all valid.

    Saves only the inputs and the per-row logsumexp; the backward pass recomputes each chunk's
    logits, turns them into softmax - onehot and accumulates the two matmul gradients.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int):
        n = hidden.shape[0]
        acc_dtype = _compute_dtype(hidden.dtype)
        ce = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        lse = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            ce[rows], correct[rows], lse[rows] = _chunk_losses_(hidden[rows] @ weight.T, targets[rows], None)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(correct)
        return ce, correct

    @staticmethod
    def backward(ctx, grad_ce: Tensor, _grad_correct: Tensor | None):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            probs = (hidden[rows] @ weight.T).to(lse.dtype).sub_(lse[rows, None]).exp_()
            grad_logits = _ce_grad_logits_(probs, targets[rows], grad_ce[rows])
            grad_weight = _backprop_chunk(grad_logits, hidden, weight, rows, grad_hidden, grad_weight, want_weight)
        return grad_hidden, _finish_weight_grad(grad_weight, weight, want_weight), None, None


def _ce_grad_logits_(probs: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """d ce / d logits = softmax - onehot(target), times the per-row scale; overwrites `probs`."""
    probs[torch.arange(probs.shape[0], device=probs.device), targets] -= 1.0
    return probs.mul_(scale[:, None].to(probs.dtype))


def _backprop_chunk(
    grad_logits: Tensor,
    hidden: Tensor,
    weight: Tensor,
    rows: slice,
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
    want_weight: bool,
    weight_scale: float = 1.0,
) -> Tensor | None:
    """Write this chunk's gradient into grad_hidden[rows]; add weight_scale x its weight gradient into
    the [V, D] accumulator (created on the first chunk, in the logits' precision, summed in place)."""
    h = hidden[rows]
    grad_logits = grad_logits.to(hidden.dtype)
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ weight
    if not want_weight:
        return None
    if grad_weight is None:
        return (grad_logits.T @ h).to(_compute_dtype(hidden.dtype)).mul_(weight_scale)
    if h.dtype == grad_weight.dtype:
        return grad_weight.addmm_(grad_logits.T, h, alpha=weight_scale)
    return grad_weight.add_(grad_logits.T @ h, alpha=weight_scale)


def _finish_weight_grad(grad_weight: Tensor | None, weight: Tensor, want_weight: bool) -> Tensor | None:
    if not want_weight:
        return None
    return torch.zeros_like(weight) if grad_weight is None else grad_weight.to(weight.dtype)


class _FusedWeightedCrossEntropy(torch.autograd.Function):
    """loss = sum_i coef_i * CE(hidden_i @ weight.T, target_i), its gradients computed in the forward.

    When the per-token coefficients are known before the forward pass, each chunk's softmax can be
    turned into its gradient at once: three matmuls per chunk instead of the four of compute-then-
    recompute, still never more than chunk_size x V logits. The gradient wrt `hidden` is stored and
    scaled by the incoming scalar in the backward pass (hence once_differentiable). The gradient wrt
    `weight` does not go through autograd: it is added, times `weight_scale`, into the caller's
    `weight_grad` buffer, so that all heads share one V x D buffer (see `_DeliverGradient`).
    Also returns the per-row CE and argmax correctness, without gradient.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        coef: Tensor,
        chunk_size: int,
        want_hidden: bool,
        weight_grad: Tensor | None,
        weight_scale: float,
    ):
        n = hidden.shape[0]
        acc_dtype = _compute_dtype(hidden.dtype)
        ce = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        want_grad = want_hidden or weight_grad is not None
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = hidden[rows] @ weight.T
            ce[rows], correct[rows], _ = _chunk_losses_(logits, targets[rows], coef[rows] if want_grad else None)
            if want_grad:  # the logits now hold their gradient
                _backprop_chunk(
                    logits, hidden, weight, rows, grad_hidden, weight_grad, weight_grad is not None, weight_scale
                )
            del logits
        ctx.grad_hidden = grad_hidden
        ctx.mark_non_differentiable(ce, correct)
        return (coef.to(acc_dtype) * ce).sum(), ce, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_ce: Tensor | None, _grad_correct: Tensor | None):
        grad_hidden, ctx.grad_hidden = ctx.grad_hidden, None
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        return grad_hidden, None, None, None, None, None, None, None


class _DeliverGradient(torch.autograd.Function):
    """A scalar zero whose backward hands `grad` (computed outside autograd) to `param`.

    Its backward pass makes the unembedding's gradient, summed over all heads, reach `param.grad`
    through autograd's own accumulation (and any hooks on it, e.g. FSDP's). The buffer is released as
    it is handed over, so autograd can adopt it without a copy.
    """

    @staticmethod
    def forward(ctx, param: Tensor, grad: Tensor) -> Tensor:
        ctx.grad = grad
        return param.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_output: Tensor):
        grad, ctx.grad = ctx.grad, None
        return grad, None


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    return_correct: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token cross-entropy of the logits `hidden @ weight.T`, never holding more than
    `chunk_size x V` of them.

    hidden [N, D] (already normed), weight [V, D] (the unembedding), targets [N]. Returns the loss
    per token [N] (0 where the target is `ignore_index`) in at least fp32, and with
    `return_correct` also whether the argmax equals the target [N] (bool, False where ignored).
    Rows with an ignored target are dropped before the unembedding, so prompt and padding cost nothing.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    valid = targets != ignore_index
    index = valid.nonzero().squeeze(1)
    ce_valid, correct_valid = _ChunkedCrossEntropy.apply(
        hidden.index_select(0, index), weight, targets.index_select(0, index), chunk_size
    )
    ce = ce_valid.new_zeros(targets.shape[0]).index_put((index,), ce_valid)
    if not return_correct:
        return ce
    correct = torch.zeros_like(valid).index_put_((index,), correct_valid)
    return ce, correct


# --------------------------------------------------------------------------- the MTP loss


def head_targets(labels: Tensor, k: int) -> Tensor:
    """Targets of head k (1-based) at every input position: labels shifted left by k, -100 beyond T."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    if k < labels.shape[1]:
        targets[:, : labels.shape[1] - k] = labels[:, k:]
    return targets


def head_target_counts(labels: Tensor, n_heads: int) -> Tensor:
    """[n] number of targets of heads 1..n in `labels` (float64: exact when summed over a step)."""
    valid = labels != IGNORE_INDEX
    return torch.stack([valid[:, k:].sum() for k in range(1, n_heads + 1)]).double()


def _step_counts(target_counts: Sequence[float] | Tensor | None, n: int) -> list[float | None]:
    """Each head's count as a float, or None per head (each call normalises by its own count)."""
    if target_counts is None:
        return [None] * n
    if isinstance(target_counts, Tensor):
        target_counts = target_counts.tolist()
    counts = [float(count) for count in target_counts]
    if len(counts) != n:
        raise ValueError(f"target_counts has {len(counts)} entries for {n} heads")
    return counts


def _denominator(tokens: Tensor, count: float | None, dtype: torch.dtype) -> Tensor:
    """What head k's sums are divided by: the step's count if given, else this batch's (at least 1)."""
    n = tokens if count is None else torch.tensor(count, dtype=torch.float64, device=tokens.device)
    return n.clamp(min=1).to(dtype)


def _resolve_heads(model: nn.Module, n_heads: int | None, head_weights: Sequence[float] | None) -> tuple[int, list[float]]:
    n_model = model.n_future_tokens
    n = n_model if n_heads is None else n_heads
    if not 1 <= n <= n_model:
        raise ValueError(f"n_heads must be in [1, {n_model}] for this model, got {n}")
    hw = [1.0] * n if head_weights is None else [float(w) for w in head_weights]
    if len(hw) != n:
        raise ValueError(f"head_weights has {len(hw)} entries for {n} heads")
    if sum(hw) == 0:
        raise ValueError("head_weights sum to zero")
    return n, hw


def _token_weights(weights: Tensor | None, k0: int, mask: Tensor) -> Tensor:
    """Weights of head k0's tokens [B, T] as constants (1 everywhere when None)."""
    if weights is None:
        return torch.ones(mask.shape, device=mask.device)
    if weights.dim() != 3 or weights.shape[:2] != mask.shape or weights.shape[2] <= k0:
        raise ValueError(
            f"weights have shape {tuple(weights.shape)}, expected [B, T, >= {k0 + 1}] with B, T = {tuple(mask.shape)}"
        )
    return weights[:, :, k0].detach()


@dataclass
class _HeadStats:
    loss: Tensor  # weighted mean CE, with graph when computed with grad
    ce: Tensor
    accuracy: Tensor
    tokens: Tensor


def _head_stats(ce: Tensor, correct: Tensor, mask: Tensor, w: Tensor, count: float | None) -> _HeadStats:
    tokens = mask.sum()
    denom = _denominator(tokens, count, ce.dtype)
    return _HeadStats(
        loss=(w.to(ce.dtype) * ce * mask).sum() / denom,
        ce=(ce.detach() * mask).sum() / denom,
        accuracy=(correct & mask).sum().to(ce.dtype) / denom,
        tokens=tokens,
    )


def _collect(stats: list[_HeadStats], hw: list[float], aux: Tensor | None) -> MTPLossOutput:
    head_losses = torch.stack([s.loss.detach() for s in stats])
    total = sum(w * s.loss.detach() for w, s in zip(hw, stats)) / sum(hw)
    aux_detached = None if aux is None else aux.detach()
    if aux_detached is not None:
        total = total + aux_detached
    return MTPLossOutput(
        loss=total,
        head_losses=head_losses,
        head_ce=torch.stack([s.ce for s in stats]),
        head_accuracy=torch.stack([s.accuracy for s in stats]),
        head_tokens=torch.stack([s.tokens for s in stats]),
        aux_loss=aux_detached,
    )


def _unembedding_weight(model: nn.Module) -> Tensor:
    """The unembedding weight as the module holds it now (the unsharded parameter under FSDP)."""
    output = model.output
    if getattr(output, "bias", None) is not None:
        raise ValueError("the unembedding has a bias; chunked cross-entropy supports weight-only heads")
    if type(output.weight).__name__ == "DTensor":
        raise RuntimeError(
            "model.output.weight is still sharded: register trunk_forward and head_forward with "
            "torch.distributed.fsdp.register_fsdp_forward_method so that FSDP unshards the root module"
        )
    return output.weight


def _product_operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The rows and the unembedding in the dtype the loss's matrix products should run in: autocast's
    where it is on (fp32 master weights, bf16 products), else their own. Autocast alone would not do:
    it leaves the in-place `addmm_` into the fp32 unembedding gradient in fp32, at twice a bf16
    product's cost on this CPU. The casts are differentiable (`hidden`'s gradient returns in fp32);
    the unembedding's gradient is accumulated in fp32 outside autograd anyway."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), weight.to(dtype)


def _head_loss(
    model: nn.Module,
    k0: int,
    h_trunk: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None,
    weights: Tensor | None,
    chunk_size: int,
    weight_grad: Tensor | None = None,
    weight_scale: float = 1.0,
    count: float | None = None,
) -> _HeadStats:
    """Head k0's block, the shared norm and unembedding, and its weighted loss, chunk by chunk.

    The loss is divided by `count` (head k0's targets in the whole step), or by this batch's number
    of targets when None. Only rows with a target reach the unembedding. The loss's gradients are
    computed in the same pass as the loss (`_FusedWeightedCrossEntropy`): wrt the head's input through autograd, wrt the
    unembedding added into `weight_grad` times `weight_scale`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, seq = labels.shape
    targets = head_targets(labels, k0 + 1).reshape(-1)
    mask = targets != IGNORE_INDEX
    index = mask.nonzero().squeeze(1)
    hidden = model.norm(model.head_forward(k0, h_trunk, attention_mask=attention_mask))
    hidden = hidden.reshape(batch * seq, -1).index_select(0, index)
    hidden, weight = _product_operands(hidden, _unembedding_weight(model))
    targets = targets.index_select(0, index)
    acc_dtype = _compute_dtype(hidden.dtype)
    w = _token_weights(weights, k0, mask.view(batch, seq)).reshape(-1).index_select(0, index)
    tokens = mask.sum()
    denom = _denominator(tokens, count, acc_dtype)
    want_hidden = torch.is_grad_enabled() and hidden.requires_grad
    loss, ce, correct = _FusedWeightedCrossEntropy.apply(
        hidden, weight, targets, w.to(acc_dtype) / denom, chunk_size, want_hidden, weight_grad, weight_scale
    )
    return _HeadStats(loss=loss, ce=ce.sum() / denom, accuracy=correct.sum().to(acc_dtype) / denom, tokens=tokens)


def _head_target_rows(
    model: nn.Module, h_trunk: Tensor, labels: Tensor, k0: int, attention_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Head k0+1's normed output at the positions where it has a target, those targets, and where
    the positions are in the flattened [B*T] batch (what a per-token score is written back to)."""
    targets = head_targets(labels, k0 + 1).reshape(-1)
    index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    hidden = model.norm(model.head_forward(k0, h_trunk, attention_mask=attention_mask))
    return hidden.reshape(targets.numel(), -1).index_select(0, index), targets.index_select(0, index), index


@torch.no_grad()
def head_token_ce(
    model: nn.Module,
    h_trunk: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    n_heads: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """[B, T, n] per-token cross-entropy of heads 1..n on the trunk output `h_trunk`, without
    gradient, in at least fp32; 0 where a head has no target. Only the targets are unembedded,
    `chunk_size` rows at a time. What Rho-1 compares between the model and its reference."""
    n = model.n_future_tokens if n_heads is None else n_heads
    if not 1 <= n <= model.n_future_tokens:
        raise ValueError(f"n_heads must be in [1, {model.n_future_tokens}] for this model, got {n}")
    batch, seq = labels.shape
    weight = _unembedding_weight(model)
    token_ce = torch.zeros((batch, seq, n), dtype=_compute_dtype(h_trunk.dtype), device=h_trunk.device)
    for k0 in range(n):
        hidden, wanted, index = _head_target_rows(model, h_trunk, labels, k0, attention_mask)
        ce, _ = _ChunkedCrossEntropy.apply(hidden, weight, wanted, chunk_size)
        column = torch.zeros(batch * seq, dtype=token_ce.dtype, device=token_ce.device)
        token_ce[..., k0] = column.index_put_((index,), ce.to(column.dtype)).view(batch, seq)
    return token_ce


@torch.no_grad()
def head_logit_grad_norms(
    model: nn.Module,
    h_trunk: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    n_heads: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """[B, T, n] for each head's target token, the norm of the gradient of its cross-entropy with
    respect to the hidden state the unembedding reads (after the head's block and the final norm):
    || W^T (softmax(W h) - onehot(y)) || = || W^T p - W[y] ||, in closed form, in at least fp32;
    0 where a head has no target. Only the targets are unembedded, `chunk_size` rows at a time, so
    [B, T, V] never exists. What the grad_norm weighting scores tokens by."""
    n = model.n_future_tokens if n_heads is None else n_heads
    batch, seq = labels.shape
    weight = _unembedding_weight(model)
    dtype = _compute_dtype(h_trunk.dtype)
    norms = torch.zeros((batch, seq, n), dtype=dtype, device=h_trunk.device)
    w = weight.to(dtype)
    for k0 in range(n):
        hidden, wanted, index = _head_target_rows(model, h_trunk, labels, k0, attention_mask)
        hidden = hidden.to(dtype)
        column = torch.zeros(batch * seq, dtype=dtype, device=h_trunk.device)
        for start in range(0, index.numel(), chunk_size):
            rows = slice(start, start + chunk_size)
            probs = torch.softmax(hidden[rows] @ w.T, dim=-1)
            grads = probs @ w - w.index_select(0, wanted[rows])
            column[index[rows]] = grads.norm(dim=-1)
        norms[..., k0] = column.view(batch, seq)
    return norms


def mtp_forward_backward(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    weights: Tensor | None = None,
    head_weights: Sequence[float] | None = None,
    chunk_size: int = 1024,
    loss_scale: float | None = 1.0,
    h_trunk: Tensor | None = None,
    trunk_loss: Tensor | None = None,
    n_heads: int | None = None,
    target_counts: Sequence[float] | Tensor | None = None,
) -> MTPLossOutput:
    """Forward and backward of the weighted MTP loss, one head at a time.

    Calls `.backward()` itself on `loss_scale * total`; the returned values are detached and unscaled.
    With `loss_scale=None`, forward only: the same losses and metrics without gradients (validation).
    total = sum_k head_weights[k] * L_k / sum_k head_weights[k] (+ trunk_loss), where
    L_k = sum_t(w * ce * mask) / N_k over head k's unmasked targets, N_k = target_counts[k] (head k's
    targets in the whole step: every micro-batch and rank) or, when None, this batch's own count.
    With target_counts the calls of a step add up to the loss and gradients of the step's batch in
    one call: accumulate with loss_scale = 1.
    `weights` is [B, T, n]: weights[b, t, k-1] weighs head k's loss at position t.

    `h_trunk` is the trunk's output when the caller ran the trunk itself, to compute something from
    it first (a critic's values, hence the weights); `trunk_loss` is a loss the caller computed from
    that `h_trunk` (a value loss), added to the total and backpropagated with the trunk, in the one
    backward pass through the trunk at the end.
    """
    n, hw = _resolve_heads(model, n_heads, head_weights)
    hw_total = sum(hw)
    counts = _step_counts(target_counts, n)
    if loss_scale is None:
        with torch.no_grad():
            h_trunk = _trunk_output(model, input_ids, attention_mask, h_trunk, trunk_loss)
            stats = [
                _head_loss(model, k0, h_trunk, labels, attention_mask, weights, chunk_size, count=counts[k0])
                for k0 in range(n)
            ]
        return _collect(stats, hw, trunk_loss)

    h_trunk = _trunk_output(model, input_ids, attention_mask, h_trunk, trunk_loss)
    # Heads write their gradient into this leaf; the trunk's graph is kept for one backward at the end.
    h_heads_input = h_trunk.detach().requires_grad_(h_trunk.requires_grad)
    # The unembedding's gradient, summed over heads in one buffer and handed to autograd at the end.
    weight = _unembedding_weight(model)
    weight_grad = None
    if weight.requires_grad:
        weight_grad = torch.zeros(weight.shape, dtype=_compute_dtype(weight.dtype), device=weight.device)

    stats: list[_HeadStats] = []
    for k0 in range(n):
        scale = hw[k0] / hw_total * loss_scale
        head = _head_loss(
            model, k0, h_heads_input, labels, attention_mask, weights, chunk_size, weight_grad, scale, counts[k0]
        )  # fmt: skip
        if head.loss.requires_grad:
            (head.loss * scale).backward()
        head.loss = head.loss.detach()
        stats.append(head)

    if weight_grad is not None:
        # Before the trunk's backward, so that a tied embedding's gradient adds into it in place.
        delivery = _DeliverGradient.apply(weight, weight_grad.to(weight.dtype))
        del weight_grad  # the buffer's only owner is now _DeliverGradient: autograd adopts it, no copy
        delivery.backward()

    roots: list[Tensor] = []
    grads: list[Tensor] = []
    if h_heads_input.grad is not None:
        roots.append(h_trunk)
        grads.append(h_heads_input.grad)
    if trunk_loss is not None and trunk_loss.requires_grad:
        roots.append(trunk_loss)
        grads.append(torch.full_like(trunk_loss, loss_scale))
    if roots:
        torch.autograd.backward(roots, grads)
    return _collect(stats, hw, trunk_loss)


def _trunk_output(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, h_trunk: Tensor | None,
    trunk_loss: Tensor | None,
) -> Tensor:
    """The caller's trunk output, or a fresh trunk forward; a trunk loss needs the caller's."""
    if trunk_loss is not None and h_trunk is None:
        raise ValueError("trunk_loss must be computed from the h_trunk passed with it")
    return model.trunk_forward(input_ids, attention_mask=attention_mask) if h_trunk is None else h_trunk


def mtp_loss_naive(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    weights: Tensor | None = None,
    head_weights: Sequence[float] | None = None,
    chunk_size: int = 1024,
    trunk_loss_fn: Callable[[Tensor], Tensor] | None = None,
    n_heads: int | None = None,
    target_counts: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, MTPLossOutput]:
    """The straightforward reference: all heads' logits materialised, one graph for everything.

    Returns the total loss with its graph (call .backward() on it) and the detached metrics.
    `chunk_size` is accepted for a drop-in signature and ignored.
    """
    del chunk_size
    n, hw = _resolve_heads(model, n_heads, head_weights)
    counts = _step_counts(target_counts, n)
    out = model(input_ids, attention_mask=attention_mask, return_all_heads=True, return_trunk=trunk_loss_fn is not None)
    logits = out.logits  # [B, T, n_model, V]
    stats = []
    for k0 in range(n):
        targets = head_targets(labels, k0 + 1)
        mask = targets != IGNORE_INDEX
        head_logits = logits[:, :, k0].float()
        ce = F.cross_entropy(
            head_logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(targets)
        correct = head_logits.argmax(dim=-1) == targets
        stats.append(_head_stats(ce, correct, mask, _token_weights(weights, k0, mask), counts[k0]))
    total = sum(w * s.loss for w, s in zip(hw, stats)) / sum(hw)
    aux = trunk_loss_fn(out.trunk_hidden) if trunk_loss_fn is not None else None
    if aux is not None:
        total = total + aux
    return total, _collect(stats, hw, aux)
