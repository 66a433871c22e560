"""The LM head and its cross-entropy in chunks: the summed next-token loss without materialising every logit.

On real vocabularies (32k to 152k words) the logits of a batch's supervised positions, in float32 and again as their
gradient, are often the largest tensors of a step. ``linear_cross_entropy`` computes the head and the loss chunk by
chunk of positions and, in the same pass, the gradients of the hidden states and the head's weight, so only one chunk's
logits exist at a time (~256 MiB by default); where autograd records nothing (``torch.no_grad``: an evaluation or a
judge running a loaded model, whose weights keep ``requires_grad``) it computes the loss alone, without the gradient
matmuls or the ``[V, D]`` float32 buffer. The numbers are those of ``F.cross_entropy(head(h).float(), targets,
reduction="sum")``: the matmul in the autocast dtype (or the hidden states' dtype without autocast), the softmax in
float32, the causal LM's own transform of its head's output included (``head_transform``: Granite's and Cohere's
scale, Gemma-2's soft-cap).

``linear_token_nll`` is the same head and loss per position (``reduction="none"``), for objectives that weigh each
sample's tokens differently (preference losses read each sample's summed log-probability from it, and the LM loss is
its sum: one pass of the head serves both). Its gradient depends on those weights, so the backward recomputes each
chunk's logits rather than the forward computing gradients ahead: one more matmul per chunk, still one chunk's logits
at a time.

The chunked path reads the head's weight and never calls the module, so it serves a plain bias-free ``nn.Linear``
only (``linear_weight``); a head that does more when called (a bias, a LoRA adapter, a class of its own) runs as a
module on the supervised positions instead, its full logits in memory, so that what it adds trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

CHUNK_BYTES = 256 << 20  # float32 logits of one chunk

# model types whose causal LM multiplies its logits by ``config.logits_scaling``; Granite (and MiniCPM3, on the hidden
# states) divide by it
MULTIPLIED_LOGITS_SCALING = frozenset({"hyperclovax"})
# model types whose config carries a ``logit_scale`` that their transformers causal LM never applies
UNUSED_LOGIT_SCALE = frozenset({"mpt"})


def scalar_problem(value: Any) -> str | None:
    """What keeps ``value`` from being a loss the trainer can add and back-propagate (a 0-dim floating tensor), or
    None: an objective's loss and a connector's auxiliary losses are checked by it, so both name what they got in the
    same words. Host-side metadata only: no device wait."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.is_floating_point():
            return None
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class HeadTransform:
    """What a causal LM does to its head's output before the softmax: a scale, then a soft-cap
    (``cap * tanh(logits / cap)``). The LM loss must apply it as the model's own forward (and generation) does, or it
    trains another model: a Granite head's logits are its output divided by ``logits_scaling``."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        """The logits are the head's output as it is (what a Llava export's LM head computes)."""
        return self.scale == 1.0 and not self.softcap

    def __call__(self, logits: Tensor) -> Tensor:
        return self.apply(logits)[0]

    def apply(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """The transformed logits, and the ``tanh`` the soft-cap's gradient needs (None without a cap)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if not self.softcap:
            return logits, None
        capped = torch.tanh(logits / self.softcap)
        return capped * self.softcap, capped

    def backward(self, grad: Tensor, capped: Tensor | None) -> Tensor:
        """The gradient with respect to the head's output from the one with respect to the logits, in place."""
        if capped is not None:
            grad *= 1 - capped * capped
        if self.scale != 1.0:
            grad *= self.scale
        return grad


PLAIN = HeadTransform()


def head_transform(config: Any) -> HeadTransform:
    """The transform transformers' causal LM of this config applies to its head's output, from the config keys that
    name one: ``logits_scaling`` (Granite's MuP divisor; HyperCLOVAX multiplies), ``logit_scale`` (Cohere's factor),
    ``final_logit_softcapping`` (Gemma-2 and 3). ``.plain`` asks whether there is none."""
    model_type = getattr(config, "model_type", "")
    scale = 1.0
    scaling = _config_number(config, "logits_scaling")
    if scaling is not None:
        if scaling == 0:
            raise ValueError("model.llm: the LLM's config has logits_scaling=0, which its head divides by")
        scale = scaling if model_type in MULTIPLIED_LOGITS_SCALING else 1.0 / scaling
    factor = None if model_type in UNUSED_LOGIT_SCALE else _config_number(config, "logit_scale")
    if factor is not None:
        scale *= factor
    return HeadTransform(scale=scale, softcap=_config_number(config, "final_logit_softcapping") or None)


def _config_number(config: Any, key: str) -> float | None:
    """``config.<key>`` as a float; a value that is not a number cannot be applied to the logits, so it is refused."""
    value = getattr(config, key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"model.llm: the LLM's config has {key}={value!r}, not a number alignlm can apply to its logits"
        )
    return float(value)


def linear_weight(head: nn.Module) -> Tensor | None:
    """The head's ``[V, D]`` weight where calling the head is that matmul alone: an ``nn.Linear`` without a bias,
    running ``nn.Linear.forward`` (a sharding wrapper's subclass does). None where calling it does more: a bias, a
    LoRA adapter (peft wraps the layer), a class of its own, a forward patched onto the instance."""
    plain = isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward and "forward" not in vars(head)
    return head.weight if plain and head.bias is None else None


def chunk_rows(vocab: int) -> int:
    """Positions per chunk so one chunk's float32 logits take about ``CHUNK_BYTES``."""
    return max(64, CHUNK_BYTES // (4 * vocab))


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, transform: HeadTransform = PLAIN, rows: int | None = None
) -> Tensor:
    """``sum_i CE(transform(hidden_i @ weight.T), targets_i)`` for ``hidden`` ``[n, D]``, ``weight`` ``[V, D]``.

    The grad mode is read here: inside ``forward`` autograd has it off, and ``ctx.needs_input_grad`` follows only
    ``requires_grad``, which a trained head's weight keeps under ``torch.no_grad`` too."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    rows = rows or chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, transform, rows, dtype, torch.is_grad_enabled())


def linear_token_nll(
    hidden: Tensor, weight: Tensor, targets: Tensor, transform: HeadTransform = PLAIN, rows: int | None = None
) -> Tensor:
    """``CE(transform(hidden_i @ weight.T), targets_i)`` for each row ``i`` of ``hidden`` ``[n, D]``: ``[n]`` float32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    rows = rows or chunk_rows(weight.shape[0])
    return _LinearTokenNLL.apply(hidden, weight, targets, transform, rows, dtype)


def _chunk_logits(h: Tensor, w: Tensor, transform: HeadTransform) -> tuple[Tensor, Tensor | None]:
    """One chunk's float32 logits (matmul in ``w``'s dtype), transformed, and the ``tanh`` a cap's gradient needs."""
    return transform.apply((h.to(w.dtype) @ w.T).float())


def _softmax_minus_onehot(
    logits: Tensor, lse: Tensor, targets: Tensor, transform: HeadTransform, capped: Tensor | None
) -> Tensor:
    """d CE / d (the head's output) per row, computed in place of ``logits``."""
    g = logits.sub_(lse[:, None]).exp_()
    g[torch.arange(len(targets), device=g.device), targets] -= 1
    return transform.backward(g, capped)


class _LinearTokenNLL(torch.autograd.Function):
    """Forward keeps each row's log-sum-exp; backward recomputes the chunk's logits and weighs each row's gradient."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, transform: HeadTransform, rows: int, dtype: torch.dtype
    ) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(nll)
            for start in range(0, hidden.shape[0], rows):
                logits, _ = _chunk_logits(hidden[start : start + rows], w, transform)
                lse[start : start + rows] = logits.logsumexp(-1)
                target = logits.gather(1, targets[start : start + rows, None]).squeeze(1)
                nll[start : start + rows] = lse[start : start + rows] - target
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.transform, ctx.rows, ctx.dtype = transform, rows, dtype
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
                logits, capped = _chunk_logits(h, w, ctx.transform)
                g = _softmax_minus_onehot(logits, lse[part], targets[part], ctx.transform, capped)
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
        transform: HeadTransform,
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
                logits, capped = _chunk_logits(h, w, transform)
                lse = logits.logsumexp(-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    g = _softmax_minus_onehot(logits, lse, t, transform, capped).to(dtype)
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
