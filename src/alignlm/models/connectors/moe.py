"""CuMo-style mixture-of-experts connector: top-k routing over ``mlp2x_gelu`` experts.

Each visual token goes to its ``top_k`` experts and their outputs are mixed by the renormalised router
probabilities; with ``top_k`` 1 the one expert's output is scaled by its router probability instead (Switch
Transformer): a renormalised weight would be exactly 1, and the router would get no gradient from the task. The
router is kept honest by two auxiliary losses, returned with their configured weights so the trainer adds them as
they are: the Switch-Transformer balance loss ``E * sum_e f_e * P_e`` (1 for perfectly uniform routing) of each
image's tokens, averaged over the images as CuMo's is (pooled over a micro-batch it was 1, its minimum, where each
image sent every token to one expert, and put no pressure on spreading an image's tokens), and the router z-loss
``mean(logsumexp(logits)^2)`` (keeps logits small).

Optional expert capacity (``capacity_factor``, GShard / Switch style, separate knobs for training and
evaluation): no expert takes more than ``ceil(capacity_factor * T * k / E)`` of a batch's ``T * k`` (token, slot)
pairs. Nothing is dropped, since a connector has no residual path to carry a dropped token: a token refused by a
full expert goes to its next preferred expert with room (``capacity_route``). The cap bounds every expert's
share from above, and so from below too: with ``E = 4, k = 2`` and a factor of 1.1 each share lies in
[17.5 %, 27.5 %]. The balance loss still sees the router's own preference, so the router keeps learning to
balance and the cap only moves the few tokens it must; the log has both loads.

Every expert runs on every token as one batched matmul per layer, and each token's output mixes the experts it
was routed to (a ``[T, E]`` gate matrix, zero for the others). That is ``E / k`` times the FLOPs of sparse dispatch
(2x for CuMo's 4 experts and top-2), on a part whose 4 experts hold about 1 % of a 7B model's FLOPs per visual token
(by parameter count, at CLIP-L's width), and it is what keeps the connector free of host waits on a GPU: sparse
dispatch sizes its buffers by how many tokens the busiest expert got, a number only the device knows. Routing is
vectorised too (``capacity_route`` loops over the ``E`` preference ranks, each round over all tokens at once), with
no shape or branch that depends on the data. (In fp16 an expert that was not chosen can overflow where sparse
dispatch never ran it, and 0 x inf makes the step non-finite, so skipped; bf16 and float32 have the range.)
``adapt_state`` upcycles a dense ``mlp2x_gelu`` connector: every expert copies the dense weights, so the MoE output
equals the dense output at step 0 whatever the router says (with ``top_k`` 1, the dense output times the chosen
expert's probability).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alignlm.models.connectors.base import Connector, ConnectorOutput


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of ``experts`` name each expert ``[E]`` (a comparison, not a bincount: that sizes its output
    by the largest id, read on the host)."""
    ids = torch.arange(num_experts, device=experts.device)
    return (experts.reshape(-1, 1) == ids).sum(0)


def balance_loss(probs: torch.Tensor, top1: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` of each of ``groups`` equal runs of tokens (an image's), averaged over them: ``f_e``
    share of the run's tokens whose top-1 expert is ``e``, ``P_e`` their mean router probability. ``probs`` ``[T, E]``,
    ``top1`` ``[T]``."""
    num_experts = probs.shape[-1]
    ids = torch.arange(num_experts, device=top1.device)
    f = (top1.reshape(groups, -1, 1) == ids).to(probs.dtype).mean(1)  # [G, E]
    return num_experts * (f * probs.reshape(groups, -1, num_experts).mean(1)).sum(-1).mean()


def capacity_route(probs: torch.Tensor, top_k: int, capacity: int) -> torch.Tensor:
    """Each token's ``top_k`` distinct experts ``[T, top_k]`` (by descending probability), no expert over ``capacity``.

    Round ``r`` offers every token still short of ``top_k`` experts to its ``r``-th preferred expert; among the
    tokens offered to one expert the most confident are taken first, until the expert is full. After ``E`` rounds
    every token has been offered every expert. Tokens can only be left short when ``capacity < T * k / (E - k + 1)``
    (all their other experts are full); they then take their best remaining experts over the cap, so every token
    always gets ``top_k`` experts. All ``E`` rounds always run (a round with nobody short changes nothing): stopping
    early would mean asking the device from the host.
    """
    t, e = probs.shape
    ids = torch.arange(e, device=probs.device)
    ranked = probs.argsort(-1, descending=True)
    taken = torch.zeros(t, e, dtype=torch.bool, device=probs.device)
    load = torch.zeros(e, dtype=torch.long, device=probs.device)
    for r in range(e):
        need = taken.sum(1) < top_k
        choice = ranked[:, r]
        score = torch.where(need, probs.gather(1, choice[:, None]).squeeze(1), -1.0)
        order = score.argsort(descending=True)  # priority: the most confident tokens first
        ch, nd = choice[order], need[order]
        offered = (ch[:, None] == ids) & nd[:, None]  # [T, E] in priority order
        queued = offered.long().cumsum(0).gather(1, ch[:, None]).squeeze(1)  # 1-based place in its expert's queue
        accept = torch.zeros_like(need)
        accept[order] = nd & (load[ch] + queued <= capacity)
        won = (choice[:, None] == ids) & accept[:, None]
        taken |= won
        load += won.sum(0)
    # over the cap, only when the factor is below E / (E - k + 1): untaken experts first, best first
    short = top_k - taken.sum(1)
    spare = probs.masked_fill(taken, -1.0).argsort(-1, descending=True)
    extra = ids[None, :] < short[:, None]
    taken.scatter_(1, spare, taken.gather(1, spare) | extra)
    return probs.masked_fill(~taken, -1.0).topk(top_k, dim=-1).indices


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean(logsumexp(logits)^2)``."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class MoEConnector(Connector):
    """Experts ``Linear(Dv, Dl) -> GELU -> Linear(Dl, Dl)``, router ``Linear(Dv, E, bias=False)``."""

    relates_samples = True  # the capacity cap counts the micro-batch's tokens together, the balance loss its images

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_experts: int = 4,
        top_k: int = 2,
        balance_weight: float = 0.1,
        z_weight: float = 0.01,
        router_lr_scale: float = 1.0,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"model.connector: need num_experts >= 1 and 1 <= top_k <= num_experts, "
                f"got num_experts={num_experts}, top_k={top_k}"
            )
        self.num_experts, self.top_k = num_experts, top_k
        self.balance_weight, self.z_weight = balance_weight, z_weight
        if router_lr_scale <= 0:
            raise ValueError(f"model.connector.router_lr_scale must be > 0, got {router_lr_scale}")
        self.router_lr_scale = router_lr_scale
        for name, factor in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if factor is not None and factor < 1:
                raise ValueError(
                    f"model.connector.{name} must be >= 1 (or null: no cap), got {factor}: below 1 the "
                    f"experts together cannot take every token's top_k slots"
                )
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.router = nn.Linear(in_dim, num_experts, bias=False)
        # Expert weights stacked [E, in, out], initialised like nn.Linear (uniform +-1/sqrt(fan_in)).
        self.w1 = nn.Parameter(self._uniform(num_experts, in_dim, out_dim))
        self.bias1 = nn.Parameter(self._uniform(num_experts, 1, out_dim, fan_in=in_dim).squeeze(1))
        self.w2 = nn.Parameter(self._uniform(num_experts, out_dim, out_dim))
        self.bias2 = nn.Parameter(self._uniform(num_experts, 1, out_dim, fan_in=out_dim).squeeze(1))

    @staticmethod
    def _uniform(e: int, rows: int, cols: int, fan_in: int | None = None) -> torch.Tensor:
        bound = 1.0 / math.sqrt(fan_in or rows)
        return torch.empty(e, rows, cols).uniform_(-bound, bound)

    def lr_scales(self) -> dict[str, float]:
        """The router trains at ``router_lr_scale`` times the connector's learning rate (see ``param_groups``)."""
        return {"router": self.router_lr_scale}

    def capacity(self, tokens: int) -> int | None:
        """The most (token, slot) pairs one expert takes in a batch of ``tokens`` (None: no cap in this mode)."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return None if factor is None else math.ceil(factor * tokens * self.top_k / self.num_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits, probabilities (float32), and the mixing weights and ids of each token's experts.

        The logits are computed with autocast off, in the router's own dtype (float32 wherever it trains): under bf16
        autocast its matmul ran in bf16 (logits 8e-3 off, the top expert another for 2 of 1000 tokens), where Switch
        Transformer's selective precision keeps the router in float32.

        The weights are the chosen experts' probabilities renormalised to sum to 1, except with ``top_k`` 1: there the
        renormalised weight is the constant 1, through which the task loss sends the router no gradient, so the
        expert's output is scaled by its probability as it is (Switch Transformer, Fedus et al. 2021, eq. 2)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = self.router(x.to(self.router.weight.dtype)).float()
        probs = logits.softmax(-1)
        capacity = self.capacity(len(x))
        if capacity is None:
            weights, experts = probs.topk(self.top_k, dim=-1)
        else:
            experts = capacity_route(probs.detach(), self.top_k, capacity)
            weights = probs.gather(1, experts)
        if self.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, probs, weights, experts

    def experts_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's output on every token ``[E, T, Dl]``, one batched matmul per layer."""
        xs = x.expand(self.num_experts, -1, -1)
        h = F.gelu(torch.baddbmm(self.bias1[:, None].to(x.dtype), xs, self.w1.to(x.dtype)))
        return torch.baddbmm(self.bias2[:, None].to(x.dtype), h, self.w2.to(x.dtype))

    def forward(self, features: torch.Tensor) -> ConnectorOutput:
        shape = features.shape[:-1]
        x = features.reshape(-1, features.shape[-1])
        logits, probs, weights, experts = self.route(x)
        gates = torch.zeros_like(probs).scatter(1, experts, weights)  # [T, E]: 0 for the experts not chosen
        out = self.experts_forward(x)  # autocast's dtype under autocast
        # the features come in the connector's dtype (``AlignLM.connect``): a trained connector's float32 mixes in
        # float32 (a tower stored in bf16 included), a frozen one stored in bf16 in bf16
        dtype = torch.promote_types(out.dtype, x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = torch.einsum("te,etd->td", gates.to(dtype), out.to(dtype))
        preferred = probs.topk(self.top_k, dim=-1).indices  # the router's own choice, before any capacity cap
        images = shape[0] if len(shape) > 1 else 1  # features [images, tokens, D]: the balance loss per image
        balance, z = balance_loss(probs, preferred[:, 0], images), z_loss(logits)
        load = expert_counts(experts, self.num_experts).float() / experts.numel()
        metrics = {"moe_balance": balance.detach(), "moe_z": z.detach()}
        metrics.update({f"expert_load/{e}": load[e] for e in range(self.num_experts)})
        if self.capacity(len(x)) is not None:
            pref = expert_counts(preferred, self.num_experts).float() / preferred.numel()
            metrics.update({f"expert_pref/{e}": pref[e] for e in range(self.num_experts)})
            kept = (experts[:, :, None] == preferred[:, None, :]).any(-1).sum()  # slots on one of the router's own
            metrics["moe_rerouted"] = 1 - kept.float() / experts.numel()  # share of slots moved off the router's choice
        return ConnectorOutput(
            y.view(*shape, -1),
            aux_losses={"moe_balance": self.balance_weight * balance, "moe_z": self.z_weight * z},
            metrics=metrics,
        )

    def adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Upcycle a dense ``mlp2x_gelu`` state (``proj.0``, ``proj.2``) into every expert; keep the router's init."""
        if not any(k.startswith("proj.") for k in state):
            return state
        dense = {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}
        if set(state) != dense:
            raise ValueError(
                f"cannot upcycle connector weights {sorted(state)}: only a dense mlp2x_gelu "
                f"connector ({sorted(dense)}) maps onto the MoE experts"
            )
        e = self.num_experts
        return {
            "router.weight": self.router.weight.detach().clone(),
            "w1": state["proj.0.weight"].t().expand(e, -1, -1).clone(),
            "bias1": state["proj.0.bias"].expand(e, -1).clone(),
            "w2": state["proj.2.weight"].t().expand(e, -1, -1).clone(),
            "bias2": state["proj.2.bias"].expand(e, -1).clone(),
        }
