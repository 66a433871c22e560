"""The LM head and its cross-entropy in chunks: the summed next-token loss without materialising every logit.

On real vocabularies (32k to 152k words) the logits of a batch's supervised positions, in float32 and again as their
gradient, are often the largest tensors of a step. ``linear_cross_entropy`` computes the head and the loss chunk by
chunk of positions and, in the same pass, the gradients of the hidden states and the head's weight, so only one chunk's
logits exist at a time (~256 MiB by default); where autograd records nothing (``torch.no_grad``: an evaluation or a
judge running a loaded model, whose weights keep ``requires_grad``) it computes the loss alone, without the gradient
matmuls or the ``[V, D]`` float32 buffer. The numbers are those of ``F.cross_entropy(head(h).float(), targets,
reduction="sum")``: the matmul in the autocast dtype (or the hidden states' dtype without autocast), the softmax in
float32, optional logit soft-capping (Gemma-2) included.

``linear_token_nll`` is the same head and loss per position (``reduction="none"``), for objectives that weigh each
sample's tokens differently (preference losses read each sample's summed log-probability from it, and the LM loss is
its sum: one pass of the head serves both). Its gradient depends on those weights, so the backward recomputes each
chunk's logits rather than the forward computing gradients ahead: one more matmul per chunk, still one chunk's logits
at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BYTES = 256 << 20  # float32 logits of one chunk


def chunk_rows(vocab: int) -> int:
    """Positions per chunk so one chunk's float32 logits take about ``CHUNK_BYTES``."""
    return max(64, CHUNK_BYTES // (4 * vocab))


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None = None, rows: int | None = None
) -> Tensor:
    """``sum_i CE(softcap(hidden_i @ weight.T), targets_i)`` for ``hidden`` ``[n, D]``, ``weight`` ``[V, D]``.

    The grad mode is read here: inside ``forward`` autograd has it off, and ``ctx.needs_input_grad`` follows only
    ``requires_grad``, which a trained head's weight keeps under ``torch.no_grad`` too."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    rows = rows or chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, softcap, rows, dtype, torch.is_grad_enabled())


def linear_token_nll(
    hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None = None, rows: int | None = None
) -> Tensor:
    """``CE(softcap(hidden_i @ weight.T), targets_i)`` for each row ``i`` of ``hidden`` ``[n, D]``: ``[n]`` float32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    rows = rows or chunk_rows(weight.shape[0])
    return _LinearTokenNLL.apply(hidden, weight, targets, softcap, rows, dtype)


def _chunk_logits(h: Tensor, w: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """One chunk's float32 logits (matmul in ``w``'s dtype), soft-capped, and the ``tanh`` the cap's gradient needs."""
    logits = (h.to(w.dtype) @ w.T).float()
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


def _softmax_minus_onehot(logits: Tensor, lse: Tensor, targets: Tensor, capped: Tensor | None) -> Tensor:
    """d CE / d (uncapped logits) per row, computed in place of ``logits``."""
    g = logits.sub_(lse[:, None]).exp_()
    g[torch.arange(len(targets), device=g.device), targets] -= 1
    if capped is not None:
        g *= 1 - capped * capped
    return g


class _LinearTokenNLL(torch.autograd.Function):
    """Forward keeps each row's log-sum-exp; backward recomputes the chunk's logits and weighs each row's gradient."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None, rows: int, dtype: torch.dtype
    ) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(nll)
            for start in range(0, hidden.shape[0], rows):
                logits, _ = _chunk_logits(hidden[start : start + rows], w, softcap)
                lse[start : start + rows] = logits.logsumexp(-1)
                target = logits.gather(1, targets[start : start + rows, None]).squeeze(1)
                nll[start : start + rows] = lse[start : start + rows] - target
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.softcap, ctx.rows, ctx.dtype = softcap, rows, dtype
        return nll

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for start in range(0, hidden.shape[0], ctx.rows):
                part = slice(start, start + ctx.rows)
                h = hidden[part].to(ctx.dtype)
                logits, capped = _chunk_logits(h, w, ctx.softcap)
                g = _softmax_minus_onehot(logits, lse[part], targets[part], capped)
                g = (g * grad_out[part, None].float()).to(ctx.dtype)
                if need_h:
                    grad_h[part] = g @ w
                if need_w:
                    grad_w += g.T @ h
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None, None


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when autograd records and asks for them, both gradients; backward only scales
    them."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        softcap: float | None,
        rows: int,
        dtype: torch.dtype,
        recorded: bool,
    ) -> Tensor:
        need_h, need_w = recorded and ctx.needs_input_grad[0], recorded and ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows].to(dtype)
                t = targets[start : start + rows]
                logits, capped = _chunk_logits(h, w, softcap)
                lse = logits.logsumexp(-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    g = _softmax_minus_onehot(logits, lse, t, capped).to(dtype)
                    if need_h:
                        grad_h[start : start + rows] = g @ w
                    if need_w:
                        grad_w += g.T @ h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None
