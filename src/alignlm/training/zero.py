"""DeepSpeed ZeRO (``distributed.strategy: zero2 | zero3``): optimizer state and gradients (ZeRO-2), and the
parameters too (ZeRO-3), partitioned over the ranks by DeepSpeed's engine, on the CPU (gloo) as on GPUs.

The trainer's step stays its own: DeepSpeed is told where a global step ends (the gradient accumulation boundary is
set per micro-batch), backward does not rescale the loss (alignlm's losses are already normalised over the whole
global step), clipping is DeepSpeed's ``gradient_clipping`` (the stage's ``max_grad_norm``), and the engine runs in
fp32 with alignlm's autocast around the forward, as under DDP. DeepSpeed skips an update whose gradient norm is not
finite in fp32, which is alignlm's rule for non-finite steps.

What DeepSpeed owns is one module, :class:`Owner`: the model and the objectives' own parameters (a learned
temperature), so ZeRO-3 partitions and gathers those too. Under ZeRO-3 the LM head's weight, which the chunked loss
reads outside the head's forward, is registered as an external parameter of the model.

Checkpoints are alignlm's files: whole trainable weights and the buffers of the parts that train (gathered on rank 0
under ZeRO-3: :func:`full_state`), and each rank's partition of the optimizer state in its own file
(``optimizer_rank<R>.pt``, written by that rank: the output folder must be shared by the nodes), so a step checkpoint
resumes on the same number of ranks and its weights read like any other.
Nothing is loaded with pickle: DeepSpeed's own ``load_checkpoint`` would unpickle arbitrary objects, so it is not used.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

STAGES = {"zero2": 2, "zero3": 3}
# entries alignlm sets from its own config, and the settings it sets them from; a user's DeepSpeed JSON (or accelerate
# launch config) may not set them
OWNED = {
    "train_batch_size": "stages.<name>.per_device_batch_size",
    "train_micro_batch_size_per_gpu": "stages.<name>.per_device_batch_size",
    "gradient_accumulation_steps": "stages.<name>.grad_accum",
    "gradient_clipping": "stages.<name>.max_grad_norm",
    "optimizer": "stages.<name>.lr, weight_decay, betas",
    "scheduler": "stages.<name>.scheduler, warmup_ratio",
    "fp16": "mixed_precision",
    "bf16": "mixed_precision",
}
_LOSS_SCALER = "loss_scaler"  # a DeepSpeed object in the ZeRO state; fp32 training never scales: not saved


class Owner(nn.Module):
    """The model and the objectives as the one module DeepSpeed wraps; its forward is the model's."""

    def __init__(self, model: nn.Module, objectives: nn.Module) -> None:
        super().__init__()
        self.model, self.objectives = model, objectives

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def check_settings(strategy: str, dist: Mapping[str, Any], mixed_precision: str) -> None:
    """Settings DeepSpeed cannot run, refused before anything is built."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            f"distributed.strategy={strategy} needs DeepSpeed: pip install 'alignlm[deepspeed]' (deepspeed==0.19.8 is "
            "what the tests use)"
        )
    if mixed_precision == "fp16":
        raise ValueError(
            f"mixed_precision=fp16 is not available with distributed.strategy={strategy}: use bf16 or no (fp16 needs "
            "a loss scaler, which alignlm's step does not run under DeepSpeed)"
        )
    if dist.get("offload_param") and STAGES[strategy] != 3:
        raise ValueError("distributed.offload_param=true needs distributed.strategy=zero3 (ZeRO-2 keeps parameters)")


def deepspeed_config(
    strategy: str,
    dist: Mapping[str, Any],
    micro_batch: int,
    accum: int,
    world: int,
    max_grad_norm: float,
    mixed_precision: str,
) -> dict[str, Any]:
    """The engine's config: alignlm's batch, accumulation, clipping and precision, the strategy's ZeRO stage and
    offloading, then ``distributed.deepspeed_config`` (a JSON file) merged over the rest (bucket sizes, ...).

    bf16 is torch's autocast inside the engine over fp32 weights, as alignlm trains under DDP (DeepSpeed turns an
    outer autocast off unless its own ``torch_autocast`` is on); no module is marked lower-precision-safe, so
    gradients are reduced in fp32 as under DDP."""
    stage = STAGES[strategy]
    zero: dict[str, Any] = {"stage": stage}
    if dist.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if dist.get("offload_param"):
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro_batch * accum * world,
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # alignlm's AdamW with per-part groups
        "zero_force_ds_cpu_optimizer": False,  # ... also when the optimizer state is offloaded to the CPU
        "steps_per_print": 2**62,
    }
    if mixed_precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    extra_file = dist.get("deepspeed_config")
    if extra_file:
        extra = {k: v for k, v in json.loads(Path(extra_file).read_text()).items() if not _auto(v)}
        owned = owned_by_alignlm(extra)
        if owned:
            raise ValueError(f"distributed.deepspeed_config={extra_file} sets {owned}: remove them")
        if "stage" in (extra.get("zero_optimization") or {}) and extra["zero_optimization"]["stage"] != stage:
            raise ValueError(
                f"distributed.deepspeed_config={extra_file} has zero_optimization.stage="
                f"{extra['zero_optimization']['stage']}, distributed.strategy={strategy}: make them agree"
            )
        for knob in ("offload_optimizer", "offload_param"):
            device = ((extra.get("zero_optimization") or {}).get(knob) or {}).get("device", "none")
            if device != "none":  # the trainer builds a CPU-ready optimizer only when its own switch is on
                raise ValueError(
                    f"distributed.deepspeed_config={extra_file} sets zero_optimization.{knob}.device={device!r}: "
                    f"offloading is alignlm's switch, set distributed.{knob}=true instead (launcher=zero3_offload "
                    "sets both); from the JSON the optimizer would be built for the GPU"
                )
        zero.update(extra.pop("zero_optimization", None) or {})
        config.update(extra)
        if zero.get("compute_grad_norm") is False:
            raise ValueError(
                f"distributed.deepspeed_config={extra_file} sets zero_optimization.compute_grad_norm=false: alignlm "
                "needs the gradient norm (clipping, the non-finite rule, the logs)"
            )
    return config


def owned_by_alignlm(keys: Iterable[str]) -> str:
    """Which of ``keys`` (DeepSpeed config entries) alignlm sets itself, and from which of its settings ('' if none),
    for a message refusing them: a second source would be silently overridden."""
    owned = [k for k in keys if k in OWNED]
    if not owned:
        return ""
    return f"{owned}, which alignlm sets itself, from {', '.join(dict.fromkeys(OWNED[k] for k in owned))}"


def _auto(value: Any) -> bool:
    """``"auto"`` (or a section of them) in a DeepSpeed JSON written for accelerate or transformers: alignlm fills it."""
    return value == "auto" or (isinstance(value, dict) and bool(value) and all(_auto(v) for v in value.values()))


@contextlib.contextmanager
def launcher_env(active: bool, cpu: bool) -> Iterator[None]:
    """What DeepSpeed reads from a launcher's environment, for the duration of a run: ``LOCAL_RANK`` (0 when no
    launcher set it) and, for CPU ranks, ``DS_ACCELERATOR=cpu`` (else DeepSpeed picks a GPU the machine has for its
    buffers). Removed afterwards, so that no later process started from this one inherits them."""
    wanted = {"LOCAL_RANK": "0", **({"DS_ACCELERATOR": "cpu"} if cpu else {})} if active else {}
    added = [k for k in wanted if k not in os.environ]
    os.environ.update({k: wanted[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def initialize(
    model: nn.Module, objectives: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]
) -> tuple[Any, Any]:
    """The DeepSpeed engine over :class:`Owner` and its ZeRO optimizer. Every rank must call it, inside
    :func:`launcher_env`; without a launcher the run makes its own one-rank group first, so world size 1 takes the
    same path."""
    import deepspeed  # noqa: PLC0415  (optional dependency: the `deepspeed` extra)

    if not torch.distributed.is_initialized():
        backend = "nccl" if next(model.parameters()).is_cuda else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        # kept for later runs in this process (DeepSpeed caches it); ended before the interpreter's teardown, where a
        # backend destroyed late can abort and lose the exit status
        atexit.register(_end_own_group, torch.distributed.group.WORLD)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    engine, zero_optimizer, _, _ = deepspeed.initialize(
        model=Owner(model, objectives), optimizer=optimizer, config=config
    )
    if config["zero_optimization"]["stage"] == 3:
        deepspeed.zero.register_external_parameter(model, model.llm.get_output_embeddings().weight)
    return engine, zero_optimizer


def _end_own_group(group: Any) -> None:
    """Destroy ``group`` if it is still the default one (the process's last moments: a failure here is no news)."""
    try:
        if torch.distributed.is_initialized() and torch.distributed.group.WORLD is group:
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001, S110 - at exit, the run's status already stands
        pass


def is_partitioned(module: nn.Module) -> bool:
    """True under ZeRO-3: the module's own parameters are empty placeholders for their partitions."""
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


def full_state(module: nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """The module's whole state dict on CPU on rank 0 (empty elsewhere), gathering one parameter at a time (a
    collective under ZeRO-3: every rank calls it). None when the parameters are whole (ZeRO-2). A parameter shared
    under several names (an LM head tied to the token embeddings, as SmolLM2's and Qwen2.5's) is gathered once and
    listed under each, as ``state_dict()`` lists it: ``named_parameters()`` names it once, and loading the state
    strictly failed on the missing head after the whole stage had trained."""
    if not is_partitioned(module):
        return None
    from deepspeed import zero as ds_zero  # noqa: PLC0415  (optional dependency)

    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, str] = {}  # a parameter's first name
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in gathered:
            gathered[id(p)] = name
            with ds_zero.GatheredParameters([p]):
                if rank == 0:
                    out[name] = p.detach().cpu().clone()
        elif rank == 0:
            out[name] = out[gathered[id(p)]]
    if rank == 0:
        persistent = set(module.state_dict())
        out.update({n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in persistent})
    return out


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy whole weights (a subset of ``module``'s state dict keys) into ZeRO-3 partitions: each parameter gathered,
    written (every rank reads the same file) and partitioned again."""
    from deepspeed import zero as ds_zero  # noqa: PLC0415  (optional dependency)

    params = dict(module.named_parameters(remove_duplicate=False))  # a tied head's name too
    with torch.no_grad():
        for name, value in state.items():
            if name in params:
                with ds_zero.GatheredParameters([params[name]], modifier_rank=0):
                    params[name].copy_(value.to(params[name].dtype))
            else:
                module.get_buffer(name).copy_(value)


def optimizer_state(zero_optimizer: Any) -> dict[str, Any]:
    """This rank's partition of the ZeRO optimizer state, tensors and plain values only (see :func:`load_optimizer`)."""
    state = dict(zero_optimizer.state_dict())
    state.pop(_LOSS_SCALER, None)
    state.pop("param_slice_mappings", None)  # for DeepSpeed's universal checkpoints; rebuilt by the engine
    return _plain(state)


def load_optimizer(zero_optimizer: Any, state: dict[str, Any]) -> None:
    """Restore this rank's :func:`optimizer_state` (saved by as many ranks as now run), master weights included, so
    the resumed run continues exactly."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    states: list[dict[str, Any] | None] = [None] * world  # DeepSpeed reads the entry of its own rank only
    states[rank] = {**state, _LOSS_SCALER: zero_optimizer.loss_scaler}
    zero_optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)


def _plain(x: Any) -> Any:
    """Containers of tensors and plain values (torch.load(weights_only=True) reads them back); other objects refused."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        items = [_plain(v) for v in x]
        return items if isinstance(x, list) else tuple(items)
    if x is None:
        return x
    for plain in (bool, int, float, str):  # an IntEnum (DeepSpeed's ZeRO stage) is saved as its number
        if isinstance(x, plain):
            return plain(x)
    raise TypeError(f"the ZeRO optimizer state holds a {type(x).__name__}, which alignlm cannot save as plain data")


@contextlib.contextmanager
def accumulating(engine: Any, last: bool) -> Iterator[None]:
    """One micro-batch's forward and backward; DeepSpeed reduces and may step only after the ``last`` one."""
    engine.set_gradient_accumulation_boundary(last)
    yield


def grad_norm(engine: Any, device: torch.device) -> torch.Tensor:
    """The global gradient norm of the step just taken (inf when DeepSpeed skipped it for a non-finite one)."""
    return torch.as_tensor(engine.get_global_grad_norm(), dtype=torch.float32, device=device).reshape(())
