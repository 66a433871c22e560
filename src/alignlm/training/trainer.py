"""One training stage on accelerate: the loop is plain code, readable in one screen (``Trainer.fit``).

Exactness choices, so that a resumed run and a data-parallel run reproduce a plain single-process run:
- the LM loss of every micro-batch is a *sum* divided by the supervised-token count of the whole global
  step (all micro-batches on all ranks), so accumulation and DDP averaging give one big batch's gradient; the other
  losses, per-micro-batch means, are divided by the global step's count of micro-batches of data (a rank's stand-in
  for a micro-batch of bad data counts for none), so they are their mean over those micro-batches;
- data order comes from ``StepSampler`` (a function of seed and step), model RNG is checkpointed per rank, and fp16's loss
  scaler with the step;
- every weight that trains is held in fp32 whatever dtype its part was loaded in (mixed precision's master weights:
  autocast computes in half precision from them; an update of a bf16 weight rounds away), and ``final/`` saves it so.

Speed choices, on by default: length-grouped batches (and packed rows where the attention kernel isolates packed
samples for free), the step never waits on the GPU (but inside DeepSpeed's engine step, where a rank without data
also reads the step's count, and with an unfused AdamW, ``fused_optimizer: false``, whose skip the host decides) (counts come from the CPU-side batch, logged values stay on the device and are fetched together every
``logging.every`` steps and before every checkpoint), frozen parts that no checkpoint saves are stored in bf16
when training in bf16 and the frozen base weights of a LoRA-adapted part in bf16 or fp16 under that mixed precision,
AdamW is fused on CUDA, data loading runs in worker processes with pinned memory on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from alignlm.config import ConfigError, instantiate
from alignlm.constants import ALIKE_ON_EVERY_RANK
from alignlm.data.build import build_dataset, image_reading_of
from alignlm.data.collate import Collator
from alignlm.data.images import loader_workers
from alignlm.data.records import TRUNCATED, DataError
from alignlm.data.report import DataReport
from alignlm.files import writing
from alignlm.models.build import build_model
from alignlm.models.io import config_yaml, trained_buffers
from alignlm.models.loading import finite
from alignlm.models.mllm import VARLEN_ATTENTION, AlignLM, has_images
from alignlm.models.precision import frozen_linears, hold_in_fp32, store_weight
from alignlm.objectives.base import Objective, check_batch, check_min_batch, check_term
from alignlm.training import checkpoint as ckpt
from alignlm.training import sharding, zero
from alignlm.training.agreement import agreed
from alignlm.training.feature_cache import attach_feature_cache
from alignlm.training.logging import MetricsLogger, get_logger, read_rows, summary_table
from alignlm.training.monitor import AlignmentMonitor
from alignlm.training.optim import build_optimizer
from alignlm.training.sampler import StepSampler
from alignlm.training.stages import apply_stage, count_params, lora_base, merge_lora, trainable_parts
from alignlm.training.throughput import (
    Meter,
    attention_flops_per_pair,
    head_flops_per_target,
    model_flops_per_token,
    peak_memory_gib,
    peak_tflops,
    reset_peak_memory,
)

LOG_EVERY = 10  # logging.every default: steps between fetches of the logged values from the device
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # mixed_precision -> autocast dtype
PACKED_ATTENTION = (*VARLEN_ATTENTION, "flex_attention")  # isolate packed samples for free (flash_attention_4 too)
# what a stage holds that may reach its model or optimizer (``Trainer.release`` lets go of them): the wrapped model,
# the optimizer with its AdamW state, the schedule over it, the objectives (DPO's holds a frozen copy of the model) and
# their parameters, the monitor and the dataset (handed the model at set-up), the stand-in batch, the model's moving
# buffers
STAGE_OBJECTS = (
    "model",
    "optimizer",
    "scheduler",
    "objectives",
    "objective_modules",
    "objective_params",
    "monitor",
    "dataset",
    "stand_in_batch",
    "moving",
)
# each loss scaler's state when the first stage on it began (``start_scaler_afresh``), dropped with the scaler
_FRESH_SCALERS: weakref.WeakKeyDictionary[torch.amp.GradScaler, dict[str, Any]] = weakref.WeakKeyDictionary()


@dataclass
class StageResult:
    """What a finished stage reports to the pipeline summary (throughput: steady state, real tokens)."""

    name: str
    final_dir: Path
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    samples_per_s: float
    tokens_per_s: float
    skipped: int
    world_size: int
    tflops: float = 0.0
    mfu: float | None = None
    peak_memory_gib: float | None = None
    data: dict[str, Any] = field(default_factory=dict)  # DataReport.to_dict(): what was left out, by cause
    nonfinite_steps: list[int] = field(default_factory=list)  # steps skipped for a non-finite loss or gradient
    process_steps: int = 0  # steps this process trained (``steps`` also counts those resumed from a checkpoint)


@dataclass
class StepLog:
    """One step's logged values: device tensors until the next fetch, plus what the host already knows.

    ``device["nonfinite"]`` is 1 when the step's loss or gradient norm was not finite (nothing was updated). Under
    fp16's loss scaler a gradient that overflowed while the loss was finite and the scale above 1 is the scaler's
    ordinary back-off, not divergence: ``device["scaler/overflow"]`` is 1 instead (nothing updated either; the scale
    halves).
    ``device["nodata"]`` is 1 on every rank when no rank had a micro-batch of data: the ranks ran stand-ins only,
    nothing was updated, and the fetch drops the step as it drops one process's step of only bad data."""

    step: int
    device: dict[str, torch.Tensor]  # summed over micro-batches on this rank; reduced over ranks at the fetch
    grad_norm: torch.Tensor | None
    host: dict[str, float]
    counts: tuple[int, int, int, int, int]  # samples, real tokens, supervised tokens, skipped samples, attended pairs
    # per metric of ``device`` (an objective's or the connector's): how many of this rank's micro-batches measured it
    measured: dict[str, int] = field(default_factory=dict)


def update_scaler(scaler: torch.amp.GradScaler, data: torch.Tensor) -> None:
    """fp16's loss scaler after a step, without the host: backing off on its own overflow flag, growing otherwise, as
    ``GradScaler.update()`` does, but where ``data`` is false (no rank had data) its scale and growth count stay as
    they were, chosen on the device. ``update(scale)``, which keeps them, is a choice the host would make."""
    scale, growth = scaler._scale, scaler._growth_tracker  # the public readers (get_scale) wait for the device
    before = scale.clone(), growth.clone()
    scaler.update()  # in place: the same tensors
    scale.copy_(torch.where(data, scale, before[0]))
    growth.copy_(torch.where(data, growth, before[1]))


def start_scaler_afresh(scaler: torch.amp.GradScaler | None) -> None:
    """fp16's loss scaler is the accelerator's, one object for all the stages of a run: stage 2 started from stage
    1's last scale and growth count, where a rerun that skips the finished stage 1 starts at the initial scale, so
    the two runs skipped different steps. Each stage starts from the state the scaler had when the first stage on it
    began (its initial scale, no growth counted); a resumed stage then loads its checkpoint's."""
    if scaler is None or not scaler.is_enabled():
        return
    scaler.load_state_dict(_FRESH_SCALERS.setdefault(scaler, scaler.state_dict()))


def progress_bar(acc: Accelerator) -> dict[str, Any]:
    """The training bar's settings: off on every rank but the main process; there, left to tqdm's own ``TQDM_*``
    variables (passing ``disable=False`` had kept ``TQDM_DISABLE=1`` from turning it off), and redrawn at most every
    30 s where stderr is a file (a CI or SLURM log had a line about 16 times a second)."""
    if not acc.is_main_process:
        return {"disable": True}
    quiet = not sys.stderr.isatty() and "TQDM_MININTERVAL" not in os.environ
    # tqdm's monitor thread redraws after maxinterval (10 s) whatever mininterval says: both, or it drew every ~15 s
    return {"dynamic_ncols": True, **({"mininterval": 30.0, "maxinterval": 30.0} if quiet else {})}


def refuse_shared_state(objectives: Mapping[str, tuple[Objective, float]], model: torch.nn.Module, where: str) -> None:
    """Refuse an objective that holds a part of the model as a submodule (``self.tower = model.vision`` in
    ``setup``): its weights became the objective's, written whole into every step checkpoint (a frozen tower or
    embedding table: gigabytes a save) or listed in two optimizer groups ("some parameters appear in more than one
    parameter group", naming nothing). An objective keeps a reference to a model part out of its state as the DPO
    reference does: ``object.__setattr__(self, "name", module)``."""
    mine = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
    for key, (obj, _) in objectives.items():
        for name, tensor in (*obj.named_parameters(), *obj.named_buffers()):
            if id(tensor) in mine:
                raise TypeError(
                    f"{where}.{key} ({type(obj).__name__}) holds the model's {mine[id(tensor)]} as its own {name}: "
                    "keep a model part out of an objective's state (object.__setattr__(self, name, part), as the DPO "
                    "reference is kept), or read it from the model passed to forward()"
                )


def build_objectives(stage: Mapping[str, Any], where: str = "stage.objectives") -> dict[str, tuple[Objective, float]]:
    """Objectives of a stage with their weights: ``total = sum(weight * loss)``; null entries are off. ``where``: the
    key they sit at, as the config spells it (``stages.<name>.objectives``), named in the errors."""
    objectives = {}
    for key, node in (stage.get("objectives") or {}).items():
        if node is None:  # switched off (a stage that inherits the LM loss and trains on another)
            continue
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        weight = float(node.pop("weight", 1.0))
        obj = instantiate(node, f"{where}.{key}")
        if not isinstance(obj, Objective):
            raise TypeError(f"{where}.{key} built a {type(obj).__name__}, not an alignlm Objective")
        check_min_batch(obj, stage.get("per_device_batch_size", 1), f"{where}.{key}")
        objectives[key] = (obj, weight)
    if not objectives:
        raise ValueError(f"{where} is empty; add at least objective lm")
    return objectives


class Trainer:
    """Trains one stage of ``cfg.stages[name]`` and writes its checkpoints and ``final/``."""

    def __init__(
        self,
        cfg: DictConfig,
        name: str,
        accelerator: Accelerator,
        steps_left: int | None = None,
        check_model: Callable[[AlignLM], None] | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        """``steps_left``: the steps this process may still train, at least 1 (``stop_after_steps`` less what the run's
        earlier stages trained in it: the pipeline counts them); None: no limit. ``check_model``: called with the model
        as built, before anything is loaded onto it (the pipeline checks every stage to train against the first
        stage's model there, rather than building one more). ``stop``: the run's stop request, whose signal handler
        the pipeline holds for the whole run; None: one of this stage's own, which sees the stop file only (a
        trainer never installs a handler: a handler that lived only as long as the stage let the signal kill the
        rank between stages)."""
        self.cfg, self.name, self.acc = cfg, name, accelerator
        self.steps_left = steps_left
        self.check_model = check_model
        self.stage = cfg.stages[name]
        self.dir = Path(cfg.output_dir) / cfg.run_name / name
        self.log = get_logger("alignlm", accelerator.process_index)
        self.dist = cfg.get("distributed") or {}  # strategy, timeout, stop signal and file
        self.stop = stop if stop is not None else StopRequest(self.dist)
        self.strategy = str(self.dist.get("strategy", "ddp"))  # resolved by the pipeline (never ``auto`` here)
        self.engine: Any = None  # the DeepSpeed engine under zero2 / zero3
        self.batch_checked = False  # this rank's first batch of data was checked against what the objectives need
        self.stop_agreed = False  # some rank was asked to stop (``fetch``)

    def core(self) -> AlignLM:
        """The model itself, whatever wraps it (DDP, the DeepSpeed engine and its owner module)."""
        model = self.acc.unwrap_model(self.model)
        return model.model if isinstance(model, zero.Owner) else model

    def setup(self) -> None:
        """The model, the stage's data and everything that steps: what ``fit`` needs, in that order; fp16's loss
        scaler from its initial state (``start_scaler_afresh``)."""
        start_scaler_afresh(self.acc.scaler)
        model = self.setup_model()
        self.setup_data(model)
        self.setup_optimization(model, self.dataset)
        self.log.info(
            "stage %s: %d steps of %d samples (global batch), %s trainable of %s params, %d processes, %s",
            self.name,
            self.total_steps,
            self.order.global_batch,
            *(f"{n:,}" for n in count_params(model)),
            self.acc.num_processes,
            self.strategy + "".join(f", {k}" for k in ("offload_optimizer", "offload_param") if self.dist.get(k)),
        )

    def setup_model(self) -> AlignLM:
        """The stage's model on the device: built, its starting weights loaded, parts frozen or trained as the stage
        says (what trains held in fp32, whatever dtype its part was loaded in: ``apply_stage``), frozen weights in
        half-precision storage under mixed precision, checkpointing and compilation as configured. All before FSDP2
        or DeepSpeed wrap the model (``setup_optimization``): they take the parameters in the dtype they have then.

        A part the stage trains fully is widened to fp32 before its starting weights load, so that a ``final/`` that
        holds it trained (in fp32) gives it unrounded, whatever ``model.<part>.dtype`` says."""
        cfg, stage, acc = self.cfg, self.stage, self.acc
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        if self.check_model is not None:
            self.check_model(model)
        # on the device before anything is widened or loaded: on the CPU every rank had made private fp32 copies of a
        # memory-mapped bf16 LLM and of the starting weights (a 7B finetune: ~30 GB a rank, 8 ranks on one node)
        model.to(acc.device)
        for part in (p for p, mode in stage.parts.items() if mode == "full" and p in model.PARTS):
            hold_in_fp32(getattr(model, part))
        init = self.init = ckpt.resolve_init(stage.get("init_from"), Path(cfg.output_dir) / cfg.run_name, cfg.stages)
        self.prev_parts = ckpt.load_init(model, init) if init else []
        self.inert = apply_stage(model, stage.parts, stage.get("lora"))  # what an older checkpoint may hold besides
        self.saved_parts = [p for p in model.PARTS if p in set(self.prev_parts) | set(trainable_parts(stage.parts))]
        self._store_frozen_in_half_precision(model)
        self.rounded = ckpt.rounded_at_start(model, init)  # given back their float32 values before LoRA merges
        enable_checkpointing(model, stage.get("gradient_checkpointing"))
        if stage.get("compile"):
            compile_llm_layers(model, "llm" in checkpointing_parts(stage.get("gradient_checkpointing") or False))
        return model

    def setup_data(self, model: AlignLM) -> None:
        """The stage's dataset (with the feature cache when configured), its step sampler and its number of steps."""
        cfg, stage, acc = self.cfg, self.stage, self.acc
        self.dataset = build_dataset(stage.data, model, cfg.seed, for_generation=False, key=f"stages.{self.name}.data")
        # start-up drops are the same on every rank: counted once
        self.report = self.dataset.report if acc.is_main_process else DataReport()
        cache_root = Path(cfg.output_dir) / "feature_cache"
        attach_feature_cache(
            model,
            self.dataset,
            stage.data.get("feature_cache"),
            cache_root,
            cfg.model.vision,
            acc,
            stage.data.get("num_workers", "auto"),
        )
        self.order = StepSampler(
            len(self.dataset),
            int(stage.per_device_batch_size),
            acc.num_processes,
            acc.process_index,
            int(stage.grad_accum),
            int(cfg.seed),
            total_steps=0,
            lengths=self.dataset.length_estimates() if (grouping := length_grouping(stage.data)) else None,
            grouping=grouping or "step",
            pools=self.dataset.pools,
        )
        self.total_steps = (
            int(stage.max_steps)
            if stage.get("max_steps")
            else int(math.ceil(float(stage.epochs) * self.order.steps_per_epoch))
        )
        left = self.order.epoch_size - self.order.steps_per_epoch * self.order.global_batch
        if left:  # every global batch is whole (one shape on every rank); the remainder waits for a later epoch
            self.log.warning(
                "stage %s: each epoch trains %d of its %d samples in %d global batches of %d; the %d left over at "
                "its end are other samples each epoch (set the batch, or max_steps over several epochs, to cover them)",
                self.name,
                self.order.steps_per_epoch * self.order.global_batch,
                self.order.epoch_size,
                self.order.steps_per_epoch,
                self.order.global_batch,
                left,
                extra=ALIKE_ON_EVERY_RANK,
            )

    def setup_optimization(self, model: AlignLM, dataset: Any) -> None:
        """Objectives (set up on ``dataset``), the monitor, optimizer and schedule over ``self.total_steps``, the
        accelerator's wrapping, and a resume from the newest checkpoint."""
        cfg, stage, acc = self.cfg, self.stage, self.acc
        self.objectives = build_objectives(stage, f"stages.{self.name}.objectives")
        if getattr(self, "order", None) is not None:  # a caller feeding its own batches builds none (the benchmark)
            self.order = rank_batches_kept(self.order, sample_relations(model, self.objectives), self.log, self.name)
        self.monitor = AlignmentMonitor(cfg.get("monitor"), model, image_reading_of(stage.data))
        for obj, _ in self.objectives.values():
            obj.setup(model, dataset)
        refuse_shared_state(self.objectives, model, f"stages.{self.name}.objectives")
        # objectives by config key: their parameters train in their own optimizer group, their state resumes
        self.objective_modules = torch.nn.ModuleDict({k: o for k, (o, _) in self.objectives.items()}).to(acc.device)
        self.objective_params = [p for p in self.objective_modules.parameters() if p.requires_grad]
        # a visual hook supplies the tower's output (the feature cache, a method's embeddings in place of images):
        # then the tower never runs
        tower_runs = getattr(dataset, "visual_hook", None) is None
        # counted before any partitioning: the weights' FLOPs per token but the LM head's, the head's per supervised
        # position, attention's per attended (query, key) pair (``step_flops``)
        self.flops_per_token = model_flops_per_token(model, tower_runs=tower_runs, head=False)
        self.flops_per_target = head_flops_per_target(model, tower_runs=tower_runs)
        self.flops_per_pair = attention_flops_per_pair(model, tower_runs=tower_runs)
        self.peak_tflops = peak_tflops(cfg.logging.get("peak_tflops", "auto"), acc.device)
        check_monitor_strategy(self.strategy, self.monitor.every)  # a Trainer built without the pipeline's checks
        if self.strategy == "fsdp2":  # sharded before the optimizer is built: it must hold the sharded parameters
            sharding.shard(model, acc.device, bool(self.dist.get("reshard_after_forward", True)))
        offload = self.strategy in zero.STAGES and bool(self.dist.get("offload_optimizer"))
        fused = {"auto": None, True: True, False: False}[stage.get("fused_optimizer", "auto")]
        optimizer, self.scheduler = build_optimizer(
            model, stage, self.total_steps, self.objective_params, fused=False if offload else fused
        )
        if self.strategy in zero.STAGES:  # DeepSpeed wraps model, objectives and optimizer; accelerate nothing
            config = zero.deepspeed_config(
                self.strategy,
                self.dist,
                int(stage.per_device_batch_size),
                int(stage.grad_accum),
                acc.num_processes,
                float(stage.get("max_grad_norm", 1.0)),
                acc.mixed_precision,
            )
            self.engine, self.optimizer = zero.initialize(model, self.objective_modules, optimizer, config)
            self.model = self.engine
        elif sharding.is_sharded(model):  # already distributed: accelerate only wraps the optimizer
            self.model, self.optimizer = model, acc.prepare(optimizer)
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        self.start_step, self.skipped = self._maybe_resume()
        # what a forward in training mode moves besides the weights (BatchNorm's running statistics): kept back from a
        # step that updates nothing (``step``); an objective's, by name (``objective_buffers``)
        self.moving = list(trained_buffers(self.core()).values())
        self.saved_buffers = set(self.objective_modules.state_dict())  # persistent=False: rebuilt, never saved

    def _store_frozen_in_half_precision(self, model: AlignLM) -> None:
        """Frozen weights run in half-precision storage under mixed precision, without re-casting their weights at
        every step, in half the memory.

        Under bf16, whole frozen parts that this stage's ``final/`` will not save: this casts their embeddings and
        norms too, which autocast leaves in fp32, so it is close to autocast's numbers but not the same (on the CPU's
        tiny model, the loss 6.257313 against 6.256911 stored in fp32, the connector's gradient 0.81 % apart, about
        what autocast itself changes against fp32: 0.74 %). Under bf16 and fp16, the frozen linear layers of a
        LoRA-adapted part (its base weights and an untied head; LoRA's own weights train in fp32): autocast casts
        exactly these to its dtype at every use, so no number of the step changes; embeddings and norms keep their
        dtype, and so do biases (``models/precision.py``). ``save_final`` merges LoRA into those layers in fp32
        (``merge_lora``)."""
        half = HALF.get(self.acc.mixed_precision)
        if half is None:
            return
        if half is torch.bfloat16:
            for part in model.frozen_parts - set(self.saved_parts):
                getattr(model, part).to(half)
        for part in (p for p, mode in self.stage.parts.items() if mode == "lora"):
            for linear in frozen_linears(getattr(model, part)):
                store_weight(linear, half)

    def _maybe_resume(self) -> tuple[int, int]:
        """Resume from the newest step checkpoint that passes its integrity check (an older one when the newest is
        damaged, naming the file); a checkpoint of another model is refused, and so are a changed world size, global
        batch or its split, stage setting, model setting, content of a file the stage names, files a frozen part loads
        or starting weights (``init_from``, which gives the parts the checkpoint does not hold) unless
        ``resume_allow_changes`` (then this run's settings, files and starting weights apply from the resumed step,
        the optimizer groups' rates among them, those a model setting scales too (a MoE router's); ``final/`` records
        the weights the first segment started from, so a later rerun still names the change). Also fixes what
        ``final/`` will record the stage was trained from."""
        self.segment_seconds, self.nonfinite, self.steady_before = 0.0, [], None
        self.peak_before: float | None = None  # the earlier segments' peak device memory, GiB
        self.nonfinite_terms: dict[str, list[int]] = {}  # a loss term not finite -> the steps (of this segment)
        self.nonfinite_metrics: set[str] = set()  # logged values not finite at a step that trained: warned once each
        self.logged_terms: set[str] = set()  # the loss terms the steps logged (loss/<objective>)
        stage = OmegaConf.to_container(self.stage, resolve=True)
        seed, precision = int(self.cfg.seed), str(self.acc.mixed_precision)
        files = ckpt.input_files(stage, self.name)  # read once, at the stage's start: its checkpoints and final/ say so
        recipe = ckpt.recipe(stage, self.name, self.total_steps, seed, precision, files)
        # with the model settings and (on the process that writes the checkpoints) the files they load
        self.recipe = ckpt.step_recipe(recipe, self.cfg.model, stamped=self.acc.is_main_process)
        # with the weights setup_model loaded (``self.init``): a resume and a rerun check they are still the ones
        self.trained_from = ckpt.trained_from(
            stage, self.name, seed, precision, self.acc.num_processes, files, self.init
        )
        self.start_key = f"stages.{self.name}.init_from{ckpt.START}"
        self.layout = ckpt.layout(self.core(), self.objective_modules)
        fresh = ckpt.optimizer_settings(self.optimizer, self.scheduler)  # before a checkpoint's state replaces them
        # resume=never: the pipeline set every stage's earlier outputs aside before the run began (ckpt.set_aside)
        if self.cfg.resume == "never" or not ckpt.step_dirs(self.dir):
            return 0, 0
        problems = []
        for folder in reversed(ckpt.step_dirs(self.dir)):
            try:
                damage = problem = ckpt.verify(folder, rank=self.acc.process_index)  # the files this rank reads
            except OSError as e:  # one rank's read error must reach the verdict every rank waits in
                damage, problem = None, f"{folder} could not be read: {type(e).__name__}: {e}"
            if problem is None:
                try:
                    written = json.loads((folder / "trainer_state.json").read_text())
                except (OSError, json.JSONDecodeError) as e:
                    problem = f"{folder}/trainer_state.json could not be read: {type(e).__name__}: {e}"
            # before loading, whose sharded weights may take collectives every rank must enter
            problem, damage = self.agreed_verdict(problem, damage)
            if damage is not None:  # known to rank 0's pruning too, which checks sizes only
                ckpt.remember_damage(folder, damage)
            if problem is None:
                # each rank compares its own files (a node's copy of the data): one refusal, on every rank
                changed = agreed(self.acc, self.resumable, folder, written)
                try:  # every file this rank restores read first: a rank alone may fail here
                    state = ckpt.read_training_state(folder, self.acc.process_index, self.objective_modules)
                except Exception as e:  # a damaged file the manifest could not vouch for: try the one before
                    problem = f"{folder} could not be read: {type(e).__name__}: {e}"
                # before applying, whose collectives (FSDP2, ZeRO-3) a rank that failed to read would never enter
                problem, _ = self.agreed_verdict(problem, None)
            if problem is None:
                try:
                    unsaved, scaled = ckpt.apply_training_state(
                        state,
                        self.core(),
                        self.optimizer,
                        self.scheduler,
                        self.acc.process_index,
                        self.objective_modules,
                        self.acc.scaler,
                    )
                except Exception as e:  # read, but not of this model's shapes or state: try the one before
                    problem = f"{folder} could not be loaded: {type(e).__name__}: {e}"
                problem, _ = self.agreed_verdict(problem, None)  # a rank that could not load it: the one before
            state = None  # what was read is not held while the checkpoint before is read (twice the host memory)
            if problem is not None:
                self.log.warning("resume: %s; falling back to the checkpoint before it", problem)
                problems.append(problem)
                continue
            if problems:
                self.log.warning("resumed from %s instead of the newest checkpoint", folder)
            if changed:
                ckpt.take_optimizer_settings(self.optimizer, self.scheduler, fresh)
                self.log.warning(
                    "resumed with resume_allow_changes=true: continuing with this run's settings and files (%s)",
                    "; ".join(ckpt.change_text(k, a, b) for k, (a, b) in changed.items()),
                )
            self.log.info("resumed stage %s from %s (step %d)", self.name, folder, written["step"])
            if not scaled:
                self.log.warning(
                    "resume: %s holds no loss scaler state (written before alignlm saved it, or without fp16): fp16's "
                    "loss scale starts afresh, and the steps whose gradients overflow while it backs off are skipped",
                    folder,
                )
            if "start" in written:  # the weights its first segment started from (a change allowed is still named later)
                self.trained_from[self.start_key] = written["start"]
            if unsaved:
                self.log.warning(
                    "resume: %s holds no buffers of the parts this stage trains (written before step checkpoints "
                    "held them): %d (%s%s) keep their values at the stage's start, so the resumed stage's final/ "
                    "holds other running statistics than an uninterrupted run's",
                    folder,
                    len(unsaved),
                    ", ".join(unsaved[:3]),
                    ", ..." if len(unsaved) > 3 else "",
                )
            if self.acc.is_main_process and "data" in written:  # the whole stage's report so far, counted once
                self.report = DataReport.from_dict(written["data"])
            self.segment_seconds = float(written.get("seconds", 0.0))
            self.steady_before = self.earlier_steady(written)  # the earlier segments' steady state
            self.peak_before = written.get("peak_memory_gib")
            self.nonfinite = list(written.get("nonfinite_steps", []))
            return int(written["step"]), int(written.get("skipped", 0))
        raise RuntimeError(
            f"no step checkpoint of {self.dir} can be resumed: {'; '.join(problems)}; "
            "delete them or rerun with resume=never to start the stage over"
        )

    def resumable(self, folder: Path, written: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """What differs between a step checkpoint and this run (``ckpt.resume_changes``), or its refusal: a
        checkpoint of another layout is refused before anything is loaded (it is whole, not damaged)."""
        refuse_config_held_state(folder, written, self.objective_modules)
        allow = bool(self.cfg.get("resume_allow_changes"))
        buffers = trained_buffers(self.core())
        changed = ckpt.resume_changes(folder, written, self.run_state(), self.name, allow, self.inert, buffers)
        if int(written["step"]) > self.total_steps:  # only with resume_allow_changes: max_steps is compared
            raise ConfigError(
                f"stages.{self.name}.max_steps={self.total_steps} ends before {folder}, at step "
                f"{written['step']}: a resume there would train nothing and record steps it did not take; "
                "raise max_steps, or rerun with resume=never to start the stage over"
            )
        return changed

    def run_state(self) -> dict[str, Any]:
        """What a step checkpoint records of the run that wrote it, and what a resume compares with its own
        (``training/checkpoint.py: resume_changes``)."""
        return {
            "world": self.acc.num_processes,
            "global_batch": self.order.global_batch,
            "strategy": self.strategy,
            "recipe": self.recipe,
            "layout": self.layout,
            "start": self.trained_from[self.start_key],  # what final/ records the stage started from
        }

    def objective_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """The objectives' persistent buffers as registered now, by name: an objective may move one in place
        (``self.calls += 1``) or assign a new tensor (``self.ema = 0.9 * self.ema + ...``), which a list taken at
        set-up would no longer hold, so a skipped step's NaN stayed in it."""
        return [(n, b) for n, b in self.objective_modules.named_buffers() if n in self.saved_buffers]

    def loss(
        self, batch: dict[str, Any], shares: tuple[torch.Tensor, torch.Tensor], data: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor | None], Any]:
        """Weighted sum of objectives (plus the connector's auxiliary losses) for one micro-batch; the losses to log,
        in their share of the step; and every metric the stage logs, its value or None where not measured.

        ``shares``: what a per-micro-batch mean weighs in this rank's loss, the number of ranks over the global step's
        micro-batches of data (the ranks' gradients averaged, each of those micro-batches weighs one over their count);
        and what a loss already gathered over the ranks' micro-batches of one slot weighs (``Objective.global_batch``),
        one over the slots in which any rank had data;
        ``data``: False for a rank's stand-in for a micro-batch of bad data, which measures nothing. The metric keys
        are the same in every micro-batch on every rank (objectives declare theirs; a connector reports the same ones
        in every training forward), so that the ranks reduce the same table."""
        model = self.core()
        needs_hidden = any(o.needs_hidden_states for o, _ in self.objectives.values())
        needs_logps = any(o.needs_sample_logps for o, _ in self.objectives.values())
        out = self.model(batch, output_hidden_states=needs_hidden, sample_logps=needs_logps)
        total = out.lm_loss.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor | None] = {}
        share, global_share = shares
        for key, (obj, weight) in self.objectives.items():
            term = obj(batch, out, model)
            check_term(f"stages.{self.name}.objectives.{key}", obj, term)
            scale = 1.0 if obj.token_normalized else global_share if obj.global_batch else share
            total = total + weight * term.loss * scale
            if not obj.token_normalized:
                logs[f"loss/{key}"] = term.loss.detach() * scale
            got = term.metrics if data else {}
            metrics.update({f"{key}/{k}": got[k].detach() if k in got else None for k in obj.metric_names})
        for key, aux in out.aux_losses.items():
            total = total + aux * share
            logs[f"aux/{key}"] = aux.detach() * share
        # a batch without images ran the connector on a zero image: its routing, codes and the like are no data
        measured = data and has_images(batch)
        metrics.update({f"connector/{k}": v.detach() if measured else None for k, v in out.metrics.items()})
        return total, logs, metrics, out

    def collator(self, hooks: Sequence[Any] = ()) -> Collator:
        """Padded rows, or packed rows where the attention kernel isolates packed samples at no extra cost.

        ``data.packing: auto`` packs when the LLM attends with flash-attention or FlexAttention, which take each
        sample's extent from its position ids and skip the other samples' tokens; with SDPA or eager attention a packed
        row needs a block-diagonal mask, which costs attention over the whole row and, on CUDA, moves SDPA off its
        flash kernel (about 20 % slower than padded on the CPU demo, docs/performance.md), so batches stay padded
        there, padding kept small by length-grouped batches. ``true`` / ``false`` force it.
        """
        data, model = self.stage.data, self.core()
        packing = data.get("packing", "auto")
        attention = getattr(model.llm.config, "_attn_implementation", None)
        if packing == "auto":
            packing = attention in PACKED_ATTENTION
        if not packing and data.get("pack_length") is not None:  # set, and nothing read it: said, not left silent
            self.log.warning(
                "stage %s: data.pack_length=%s is unused: batches are padded, not packed (data.packing=%s, attention "
                "%s; auto packs under %s)",
                self.name,
                data.pack_length,
                data.get("packing", "auto"),
                attention,
                ", ".join(PACKED_ATTENTION),
                extra=ALIKE_ON_EVERY_RANK,
            )
        return Collator(
            model.tokenizer.pad_token_id,
            hooks=hooks,
            pack_length=int(data.get("pack_length") or data.get("max_length", 2048)) if packing else None,
            image_token_id=model.image_token_id,
            num_image_tokens=model.num_image_tokens,
        )

    def loader(self) -> DataLoader:
        """The stage's batches from ``start_step`` on; workers and pinned memory on CUDA by default."""
        data, cuda = self.stage.data, self.acc.device.type == "cuda"
        workers = loader_workers(data.get("num_workers", "auto"), self.acc.device, self.acc.num_processes)
        order = dataclasses.replace(self.order, total_steps=self.total_steps, start_step=self.start_step)
        extra: dict[str, Any] = {}
        if int(workers) > 0:
            stop = self.dist.get("stop_signal")
            extra = {"persistent_workers": True, "prefetch_factor": 4}
            # a stop signal sent to the whole process group (kill -USR1 -PGID) asks the rank to stop cleanly; its
            # workers, forked before the rank's handler exists, would die of it instead
            extra["worker_init_fn"] = functools.partial(ignore_signal, str(stop)) if stop else None
        return DataLoader(
            self.dataset,
            batch_sampler=order,
            collate_fn=self.collator(self.dataset.hooks),
            num_workers=int(workers),
            pin_memory=cuda,
            # its own generator: making the iterator draws the workers' base seed, which from torch's global stream
            # (restored by a resume just before) shifted every later random draw of a resumed run, dropout included
            generator=torch.Generator().manual_seed(int(self.cfg.seed) + self.acc.process_index),
            **extra,
        )

    def step(self, micro: list[dict[str, Any]], step: int) -> StepLog | None:
        """One optimizer step over this rank's micro-batches; nothing here waits on the device (but DeepSpeed's step and
        an unfused optimizer's: ``optimizer_step``).

        A micro-batch whose samples were all skipped is replaced by an empty batch, so the step trains on the rest of
        its data (normalised by their supervised tokens, as one big batch without them; a per-micro-batch loss by their
        number over all ranks, its mean over them) and every rank stays in step without asking the others; one
        process whose every micro-batch was bad skips the step, its schedule advancing. So do ranks of which none had
        a micro-batch of data: they learn it from the same reduced count, on the device, which no host waits for
        (``device["nodata"]``): the step runs its stand-ins, updates nothing (``optimizer_step``), counts as no
        divergence and is dropped from the logs at the fetch. DeepSpeed's engine takes no such flag: there a rank
        without data reads the count (the engine's step reads its gradient norm to the host anyway) and, when no rank
        had data, every rank skips the step before its forward, as one process does. The stand-in measures no metric;
        a metric is logged as its mean over the micro-batches that measured it. A step that updates nothing leaves the
        buffers its forwards moved as they were (a trained BatchNorm tower's running statistics: a non-finite step
        had written NaN statistics into every later checkpoint and ``final/``).
        """
        acc = self.acc
        host = self.learning_rates()  # the rates this step's update uses (the schedule moves on after it)
        skipped = sum(len(b["skipped"]) for b in micro)
        for b in micro:  # per cause, on this rank; merged over ranks at checkpoints and at the end
            for sample in b["skipped"]:
                self.report.add(sample.cause, sample.id, reason=sample.reason)
            for rid in b.get("truncated", []):
                self.report.add(TRUNCATED, rid)
        data = [b.get("input_ids") is not None for b in micro]  # False: every sample of the micro-batch was bad
        local_items = sum(len(b["lm_targets"]) for b, real in zip(micro, data) if real)  # a stand-in supervises none
        # the supervised tokens and the micro-batches of data of the global step: fill kernels (a copy from the host
        # would sync), then one queued collective that no host reads (but a rank without data under DeepSpeed)
        # and, per accumulation slot, whether it held data (how many ranks did, once reduced)
        counts = (local_items, sum(data), *data)
        totals = torch.stack([torch.full((), float(n), device=acc.device) for n in counts])
        if acc.num_processes > 1:
            totals = acc.reduce(totals, "sum")
        n_items, share = totals[0], acc.num_processes / totals[1].clamp(min=1)
        global_share = 1 / (totals[2:] > 0).sum().clamp(min=1)  # over the slots in which any rank had data
        has_data = totals[1] > 0  # False: every micro-batch of every rank was bad data, the step must update nothing
        if not any(data) and (acc.num_processes == 1 or (self.engine is not None and not bool(has_data))):
            self.log.warning("step %d skipped: all its samples were bad data (see the skipped count)", step)
            self.scheduler.step()  # the schedule counts steps, taken or not, as the data order does
            return StepLog(step, {}, None, {}, (0, 0, 0, skipped, 0))
        if any(data) and not self.batch_checked:  # this rank's first batch of data, not a stand-in for bad data
            check_batch(
                {f"objective {k}": o.requires_batch_keys for k, (o, _) in self.objectives.items()}
                | {"the model's extra parts": self.core().requires_batch_keys},
                micro[data.index(True)],
            )
            self.batch_checked = True
        kept = [b if real else self.stand_in_batch for b, real in zip(micro, data)]
        samples = sum(b["num_samples"] for b in kept)
        tokens = sum(b["num_tokens"] for b in kept)
        pairs = sum(b.get("attended_pairs", 0) for b in kept)  # an empty stand-in batch attends to nothing
        kept = [send_to_device(b, acc.device, non_blocking=True) for b in kept]
        before = [b.clone() for b in self.moving]
        held = {n: b.clone() for n, b in self.objective_buffers()}
        sums: dict[str, torch.Tensor] = {}
        measured: dict[str, int] = {}
        nothing = torch.zeros((), device=acc.device)  # summed where a micro-batch measured nothing
        for i, (batch, real) in enumerate(zip(kept, data)):
            batch["num_items_in_batch"] = n_items / acc.num_processes
            last = i == len(kept) - 1
            if self.engine is not None:  # DeepSpeed reduces as it goes and steps after the last micro-batch
                sync = zero.accumulating(self.engine, last)
            elif last:  # gradients reduced once, after the last micro-batch
                sync = contextlib.nullcontext()
            elif sharding.is_sharded(self.model):
                sync = sharding.no_gradient_sync(self.model)
            else:
                sync = acc.no_sync(self.model)
            with sync, acc.autocast():
                total, logs, metrics, out = self.loss(batch, (share, global_share), real)
                if self.engine is not None:  # the loss is already normalised over the global step
                    self.engine.backward(total, scale_wrt_gas=False)
                else:
                    acc.backward(total)
            for k, v in {"loss/total": total.detach(), "loss/lm_sum": out.lm_loss_sum, **logs}.items():
                sums[k] = sums[k] + v if k in sums else v
            for k, v in metrics.items():  # every key in every step: a zero where nothing was measured
                measured[k] = measured.get(k, 0) + (v is not None)
                v = nothing if v is None else v
                sums[k] = sums[k] + v if k in sums else v
        max_norm = float(self.stage.get("max_grad_norm", 1.0))
        scale = getattr(acc.scaler, "_scale", None)  # fp16: the scale this step's backward ran at (updated below)
        scaled = None if scale is None else scale > 1
        if self.engine is not None:  # reduces, clips to max_grad_norm and skips a step whose gradient is not finite
            self.engine.step()
            grad_norm = zero.grad_norm(self.engine, acc.device)
            finite = torch.isfinite(sums["loss/total"]) & torch.isfinite(grad_norm)
        else:
            if acc.num_processes > 1:  # objective parameters live outside the DDP model: average their gradients
                for p in self.objective_params:
                    p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), "mean")
            acc.unscale_gradients()  # fp16: the gradient scaler's factor out first
            grad_norm = sharding.clip_gradients(
                [self.model.parameters(), self.objective_params], max_norm if max_norm > 0 else math.inf
            )
            finite = torch.isfinite(sums["loss/total"]) & torch.isfinite(grad_norm)
            self.optimizer_step(finite, has_data)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for now, was in zip(self.moving, before):  # a skipped step changes nothing, on the device (no wait)
            now.copy_(torch.where(finite & has_data, now, was))
        for name, now in self.objective_buffers():
            if name in held:  # one registered in this step's forward has nothing to go back to
                now.copy_(torch.where(finite & has_data, now, held[name]))
        diverged = ~finite & has_data  # a step of no data was skipped, not diverged
        # fp16: a gradient that overflowed under a finite loss is the loss scaler backing off, not divergence, where
        # the scale was above 1; at 1 or below no scaling made it overflow, and backing off for ever (every step
        # skipped, the stage never stopped) had hidden a gradient that is not finite
        if self.acc.scaler is not None:
            overflow = torch.isfinite(sums["loss/total"]) & diverged
            overflow = overflow if scaled is None else overflow & scaled
            sums["scaler/overflow"] = overflow.float()
            diverged = diverged & ~overflow
        sums["nonfinite"] = diverged.float()
        sums["nodata"] = (~has_data).float()
        counts = (samples, tokens, local_items, skipped, pairs)
        return StepLog(step, sums, grad_norm, host, counts, measured)  # the norm before clipping, clipped or not

    def learning_rates(self) -> dict[str, float]:
        """``lr``: the first parameter group's rate for the coming update (the part listed first that trains); with
        several parts, objectives or scaled sub-modules, each group's as ``lr/<group name>`` too (it logged the last
        group's rate after the schedule's step: the next update's, of the MoE router or a contrastive temperature)."""
        rates = {
            g.get("name", str(i)): lr
            for i, (g, lr) in enumerate(zip(self.optimizer.param_groups, self.scheduler.get_last_lr()))
        }
        first = next(iter(rates.values()))
        return {"lr": first, **({f"lr/{k}": v for k, v in rates.items()} if len(rates) > 1 else {})}

    def optimizer_step(self, finite: torch.Tensor, data: torch.Tensor) -> None:
        """Update unless the loss or the gradient is not finite, or no rank had data (``data`` false: the ranks ran
        stand-ins only, whose zero gradients would still move the weights through AdamW's momentum and weight decay).
        A fused optimizer skips the update on the device (its ``found_inf``, as a gradient scaler hands it one): no
        wait for the host, under fp16 too; otherwise the host decides (one read of ``update``). A skipped step under
        fp16 still updates the gradient scaler (its gradients were unscaled, and unscaling again before an update
        raises): backing off where the gradients overflowed, keeping its scale and growth count after a step of no
        data, as one process, which skips such a step before unscaling."""
        update = finite & data
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        scaler = self.acc.scaler
        if inner.defaults.get("fused"):
            # the gradients are unscaled already (``unscale_gradients``) and an overflow made the clipped norm, so
            # ``finite``, false: ``~update`` is the flag GradScaler.step would hand the kernel, "no data" folded in
            inner.found_inf = (~update).float()  # 0-dim, like the step counters the fused kernel corrects with it
            try:
                inner.step()  # what accelerate's wrapper calls, less its scaler's step and update, done here
            finally:
                del inner.found_inf
            if scaler is not None:
                update_scaler(scaler, data)
        elif bool(update):
            self.optimizer.step()
        elif scaler is not None:
            # the host has waited for ``update`` already: reading ``data`` waits on nothing
            scaler.update(None if bool(data) else scaler.get_scale())

    @functools.cached_property
    def stand_in_batch(self) -> dict[str, Any]:
        """A one-token batch that supervises nothing and has no image: a rank's stand-in for a micro-batch of bad data,
        with the slot tokens of the model's extra input parts that a sample without an image gets (the model refuses
        a sample without them).

        Made once per stage (it depends on the tokenizer's pad id and the image slots only) and, where the loader pins
        its batches (CUDA), pinned too: a ``non_blocking`` copy from pageable memory waits for the host. Nothing
        writes to it: ``send_to_device`` hands the step a new dict, and each step only reads its tensors."""
        pad = self.dataset.tokenizer.pad_token_id
        slots = self.dataset.slots_for(with_images=False)
        collate = Collator(
            pad, image_token_id=self.dataset.image_token_id, num_image_tokens=self.dataset.num_image_tokens
        )
        batch = collate(
            [
                {
                    "id": "empty",
                    "input_ids": torch.tensor([*slots, pad]),
                    "labels": torch.full((len(slots) + 1,), -100),
                    "pixel_values": None,
                    "n_images": 0,
                }
            ]
        )
        if self.acc.device.type == "cuda":  # the loader's pin_memory
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def fetch(self, pending: list[StepLog]) -> list[tuple[int, dict[str, Any], int, int, float]]:
        """The global values of buffered steps: one collective and one device-to-host copy for all of them.

        Losses are their sum over the ranks' shares; a metric is its mean over the micro-batches of all ranks that
        measured it, None where none did. Every rank reduces the same columns: the same keys in every step."""
        if not pending:
            return []
        keys = sorted({k for s in pending for k in s.device})
        metric_keys = sorted({k for s in pending for k in s.measured})
        device = self.acc.device
        zero = torch.zeros((), device=device)
        # this rank got the stop signal or sees the stop file: every rank learns it in the same reduce
        stop = float(self.stop.asked())
        host = [[*s.counts, *(s.measured.get(k, 0) for k in metric_keys), stop] for s in pending]
        table = torch.tensor(host, dtype=torch.float32).to(device)  # one copy
        if keys:
            logged = torch.stack([torch.stack([s.device.get(k, zero).float() for k in keys]) for s in pending])
            table = torch.cat([logged, table], dim=1)
        if self.acc.num_processes > 1:
            table = self.acc.reduce(table, "sum")
        norms = [s.grad_norm.float() if s.grad_norm is not None else zero - 1 for s in pending]
        values, norms = table.tolist(), torch.stack(norms).tolist()
        self.stop_agreed = values[-1][-1] > 0
        rows = []
        for s, v, norm in zip(pending, values, norms):
            samples, tokens, items, skipped, pairs = v[len(keys) : len(keys) + 5]
            seen = dict(zip(metric_keys, v[len(keys) + 5 : -1]))
            self.skipped += int(skipped)
            got = dict(zip(keys, v[: len(keys)]))
            if not s.device or got.pop("nodata") > 0:  # only bad data, on one process or on every rank: nothing trained
                continue
            nonfinite = got.pop("nonfinite") > 0
            row = {
                "loss/total": got.pop("loss/total") / self.acc.num_processes,
                "loss/lm": got.pop("loss/lm_sum") / max(items, 1.0),
            }
            row.update({k: x / self.acc.num_processes for k, x in got.items() if k not in seen})
            row.update({k: got[k] / n if n else None for k, n in seen.items()})
            row.update(s.host)
            if s.grad_norm is not None:
                row["grad_norm"] = norm
            backed_off = bool(row.get("scaler/overflow"))  # fp16's loss scaler: an overflowed gradient is its work
            bad = [
                k
                for k, x in row.items()
                if isinstance(x, float) and not math.isfinite(x) and not (backed_off and k == "grad_norm")
            ]
            self.logged_terms.update(k for k in row if k.startswith("loss/") and k != "loss/total")
            if nonfinite:  # which terms, for the message that stops the stage
                for term in (k for k in bad if k.startswith("loss/") and k != "loss/total"):
                    self.nonfinite_terms.setdefault(term, []).append(s.step)
            for key in (
                k for k in bad if not nonfinite and k not in self.nonfinite_metrics and self.acc.is_main_process
            ):
                self.nonfinite_metrics.add(key)  # a step that trained: said once per key, not only a null in the log
                self.log.warning(
                    "stage %s: %s was not finite at step %d, a step whose loss was (logged as null): what computes it "
                    "may have stopped working (a learnable temperature past its range, an objective pinned at chance)",
                    self.name,
                    key,
                    s.step,
                )
            row = {k: (x if not isinstance(x, float) or math.isfinite(x) else None) for k, x in row.items()}
            if nonfinite:  # skipped: logged, as null where a value was not finite, never hidden
                row["nonfinite"] = True
                self.nonfinite.append(s.step)
            row["skipped"] = self.skipped
            rows.append((s.step, row, int(samples), int(tokens), self.step_flops(tokens, items, pairs)))
        return rows

    @contextlib.contextmanager
    def failure_names_rank_and_step(self) -> Iterator[Any]:
        """An error inside the step loop (a collective that timed out or lost a peer, a device fault) is logged with
        this rank and the step before it propagates; the launcher then ends the other ranks. So is SIGTERM, which is
        how torchrun ends the surviving ranks when one dies: it can arrive before a rank's next collective would
        have failed, and without this the job would end with no rank naming its step.

        SIGTERM is not a stop request (``StopRequest``): that same SIGTERM from torchrun would then send the
        survivors into a checkpoint's collectives with a dead peer, and torchrun kills a rank 30 s after its SIGTERM,
        too soon for a large checkpoint anyway. SLURM's preemption and time limit send it too: the time limit's warning
        (``--signal``, scripts/slurm/train.sbatch) is what stops with a checkpoint."""
        at = types.SimpleNamespace(step=self.start_step)

        def terminated(signum: int, frame: Any) -> None:
            raise Terminated(
                "SIGTERM: the launcher ends every rank once one has failed (its report names that rank), or the job "
                "was cancelled, preempted or reached its time limit (no checkpoint now: the stop file or "
                "distributed.stop_signal stops with one)"
            )

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminated) if main else None
        try:
            yield at
        except (StopTraining, TrainingError, DataError):
            raise
        except Exception as e:
            timeout = self.dist.get("timeout_s", 600)
            collective = isinstance(e, torch.distributed.DistError) or any(
                w in str(e) for w in ("gloo", "NCCL", "Connection closed", "Timed out", "timed out")
            )
            hint = (
                f" (a collective failed: another rank stopped, or did not reach it within distributed.timeout_s={timeout})"
                if collective and self.acc.num_processes > 1
                else ""
            )
            self.log.error(
                "rank %d of %d: stage %s failed at step %d%s: %s: %s",
                self.acc.process_index,
                self.acc.num_processes,
                self.name,
                at.step,
                hint,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)

    def step_flops(self, tokens: float, targets: float, pairs: float) -> float:
        """Model FLOPs of a step (training/throughput.py's formula) from its counts, all taken on the host from the
        batches: the weights' share per real token, the LM head's per supervised position (``targets``), attention's
        per attended pair."""
        return tokens * self.flops_per_token + targets * self.flops_per_target + pairs * self.flops_per_pair

    def peak_memory(self) -> float | None:
        """The stage's peak device memory so far, GiB (None off CUDA): this segment's and its earlier segments' (a
        checkpoint carries theirs), as ``summary.json`` reports it; a resumed stage had reported its last segment's."""
        mine = peak_memory_gib(self.acc.device)
        return max(mine, self.peak_before) if mine is not None and self.peak_before is not None else mine

    def earlier_steady(self, written: Mapping[str, Any]) -> list[float] | None:
        """The steady state of the segments before a resume (``Meter.steady_totals``) from its checkpoint's state. A
        checkpoint written before the head was charged per supervised position kept attended pairs in place of FLOPs
        (``steady``): its segments are counted as they were then, the head at every token."""
        if "throughput" in written:
            return list(written["throughput"])
        if "steady" not in written:
            return None
        samples, tokens, pairs, seconds = written["steady"]
        return [samples, tokens, self.step_flops(tokens, tokens, pairs), seconds]

    def check_divergence(self, after: int) -> None:
        """``nonfinite.stop_after`` skipped steps within any ``nonfinite.window`` steps stop the stage: each skipped
        step after step ``after`` (those of the values just fetched) ends a window to count. Only the window ending
        at the last fetched step was counted, so whether a run stopped hung on where a resume had put its fetches."""
        policy = self.cfg.get("nonfinite") or {}
        limit, window = int(policy.get("stop_after", 5)), int(policy.get("window", 100))
        if not limit:
            return
        for end in (s for s in self.nonfinite if s > after):
            recent = [s for s in self.nonfinite if end - window < s <= end]
            if len(recent) >= limit:
                raise TrainingError(
                    f"stage {self.name}: {len(recent)} of the {window} steps up to step {end} had a non-finite loss or "
                    f"gradient (steps {recent}); each was skipped, nothing was updated, and the run stops here "
                    f"(nonfinite.stop_after={limit}). {self.nonfinite_advice()}, or resume from the last checkpoint"
                )

    def nonfinite_advice(self) -> str:
        """What to look at for the skipped steps: the loss terms that were not finite where some were (an objective's
        knob or weight, its inputs; the advice had been the learning rate's whatever the term), else the gradient."""
        if self.nonfinite_terms:
            terms = "; ".join(f"{k} at steps {v[:5]}" for k, v in sorted(self.nonfinite_terms.items()))
            if set(self.nonfinite_terms) >= set(self.logged_terms):  # every term: the weights, not one objective
                return f"Not finite: {terms}, every term. Lower the learning rate (stage.lr), or check the data"
            return (
                f"Not finite: {terms}; the other terms were. Look at what computes those (its objective's knobs and "
                "weight, the inputs it reads), then the learning rate (stage.lr) and the data"
            )
        return "Every loss term was finite, the gradient was not: lower the learning rate (stage.lr), or check the data"

    def check_finite_weights(self) -> None:
        """Never write a checkpoint with a non-finite weight, or a non-finite buffer of a part that trains."""
        bad = sharding.nonfinite_trainable(self.core())
        bad += [n for n, b in trained_buffers(self.core()).items() if not finite(b)]
        if sharding.is_sharded(self.model) or zero.is_partitioned(self.core()):  # each rank saw its own shard
            bad = sorted({n for part in gather_object([bad]) for n in part})
        if bad:
            raise TrainingError(
                f"stage {self.name}: non-finite weights in {bad[:5]} ({len(bad)} tensors); no checkpoint was written"
            )

    def fit(self) -> StageResult:
        """Train the stage and write its ``final/``. However it ends, its metrics log and wandb run are closed
        (``metrics_logger``) and its model, optimizer and engine let go of (``release``)."""
        try:
            reset_peak_memory(self.acc.device)
            self.setup()
            with self.metrics_logger() as metrics:
                return self.train(metrics)
        finally:
            self.release()

    @contextlib.contextmanager
    def metrics_logger(self) -> Iterator[MetricsLogger]:
        """The stage's ``metrics.jsonl`` and wandb run, closed however the stage ends. One that raises (it diverged,
        bad data, out of memory, Ctrl-C) finishes its wandb run as failed: left open, the run was finished by the next
        ``wandb.init`` in the process (a sweep script's next config) and recorded as a success. A clean stop
        (``StopTraining``: stop_after_steps, the stop signal or file) is no failure: its rerun continues the run."""
        metrics = MetricsLogger(
            self.dir / "metrics.jsonl",
            self.cfg.logging.get("wandb"),
            f"{self.cfg.run_name}/{self.name}",
            OmegaConf.to_container(self.cfg, resolve=True),
            self.acc.is_main_process,
            self.start_step,
        )
        try:
            yield metrics
        except BaseException as e:
            metrics.close(failed=not isinstance(e, StopTraining))
            raise
        metrics.close()

    def release(self) -> None:
        """Let go of the stage's model, optimizer (with its AdamW state), schedule, objectives and DeepSpeed engine,
        whether it finished or raised. The run's one accelerator kept every model and optimizer prepared on it
        (``prepare`` appends them to its lists) until the run ended: the later stages and the evaluation ran beside
        every earlier stage's weights and optimizer state (a 7B finetune's 28 GB and 56 GB). Those lists are emptied
        and nothing else: the process group, the gradient state and the loss scaler stay for the next stage. The
        engine, which alignlm makes itself (``zero.initialize``), is destroyed here: its hooks and buffers go, as
        accelerate's ``free_memory`` does for an engine of its own. On CUDA a collection and CUDA's cached blocks go
        last."""
        if self.engine is not None:
            self.engine.destroy()
        self.engine = None
        for name in STAGE_OBJECTS:
            self.__dict__.pop(name, None)
        if self.acc.device.type == "cuda":
            self.acc.free_memory()
            gc.collect()  # the models' reference cycles (modules, hooks): before the cache is emptied
            torch.cuda.empty_cache()
        else:  # no device memory to hand back now: the lists emptied without free_memory's two full collections (a
            # second a stage in a long-lived process: minutes over the test suite's stages); the collector frees
            # the models' cycles in its own time
            for held in (self.acc._models, self.acc._optimizers, self.acc._schedulers, self.acc._dataloaders):
                held.clear()

    def train(self, metrics: MetricsLogger) -> StageResult:
        """The step loop of a stage set up, logging to ``metrics``, then its ``final/`` (``fit``)."""
        acc, st = self.acc, self.stage
        if acc.is_main_process:  # what eval needs to rebuild a step checkpoint before final/ exists
            (self.dir / "config.yaml").write_text(config_yaml(self.cfg))
        batches = start_workers(self.loader())
        accum, every = int(st.grad_accum), int(self.cfg.logging.get("every") or LOG_EVERY)
        stop_at = min(
            self.total_steps, self.start_step + (self.total_steps if self.steps_left is None else self.steps_left)
        )
        meter = self.meter = Meter(earlier=self.steady_before)
        self.clock = meter.start
        pending: list[StepLog] = []
        self.model.train()
        self.monitor.start()

        issued: dict[int, float] = {}  # step -> host time it was issued at, for the meter

        def flush() -> None:
            after = pending[0].step - 1 if pending else 0
            rows = self.fetch(pending)  # waits for the device: every pending step is done
            meter.settle()
            for step, _, samples, tokens, flops in rows:
                meter.add(samples, tokens, issued.pop(step), flops)
            issued.clear()  # steps skipped for bad data are not in the rows
            sps, tps, fps = meter.rates()
            for step, row, *_ in rows:
                row.update({"samples_per_s": sps, "tokens_per_s": tps, "tflops": fps / 1e12})
                if self.peak_tflops:
                    row["mfu"] = row["tflops"] / (self.peak_tflops * acc.num_processes)
                memory = self.peak_memory()
                if memory is not None:
                    row["memory/peak_gib"] = memory
                row.update(monitored.pop(step, {}))
                metrics.log(row, step)
            if rows:
                loss = rows[-1][1]["loss/total"]
                bar.set_postfix(
                    loss="skipped" if loss is None else f"{loss:.4f}", sps=f"{sps:.2f}", tps=f"{tps:.0f}", refresh=False
                )
            pending.clear()
            self.check_divergence(after)

        monitored: dict[int, dict[str, float]] = {}
        why, saved_at = "stop_after_steps", 0
        with (
            tqdm(total=self.total_steps, initial=self.start_step, desc=self.name, **progress_bar(acc)) as bar,
            self.failure_names_rank_and_step() as at,
        ):
            for step in range(self.start_step + 1, stop_at + 1):
                at.step = step
                log = self.step([next(batches) for _ in range(accum)], step)
                issued[step] = time.perf_counter()
                pending.append(log)
                if log.device and self.monitor.due(step):
                    with acc.autocast():  # the precision the step trains in (a frozen tower is bf16)
                        monitored[step] = self.monitor(step, self.core())
                bar.update(1)
                due_checkpoint = int(st.save_every) and step % int(st.save_every) == 0 and step < self.total_steps
                # every ``every`` steps counted from the stage's start, not from a resume: the same fetches either way
                if step % every == 0 or due_checkpoint or step == stop_at:
                    flush()
                # a rank was asked to stop: all stop here; at the stage's last step the stage ends first, and the
                # pipeline stops before what follows it (``StopRequest``)
                if self.stop_agreed and step < self.total_steps:
                    stop_at, why = step, STOP_WHY
                    break
                if due_checkpoint:  # right after a flush: the device is done, the steady window leaves the save out
                    saving = time.perf_counter()
                    self.save_checkpoint(step)
                    meter.leave_out(time.perf_counter() - saving)
                    saved_at = step
        self.report = self.merged_report()
        if stop_at < self.total_steps:
            if saved_at != stop_at:  # not twice: a checkpoint of a 7B run with its optimizer state is ~100 GB
                self.save_checkpoint(stop_at, merge=False)
            if self.stop_agreed:
                self.stop.served(acc)
            raise StopTraining(f"stopped after step {stop_at} of {self.total_steps} ({why}); rerun to resume")
        # the whole stage, every resumed segment included: the main process reads its log and every rank learns it
        # (steps trained, first and last loss); the other ranks had kept every step's loss for it
        trained, skipped = self.logged_losses() if acc.is_main_process else ([], (0, 0))
        gone = acc.is_main_process and not metrics.path.exists()  # written on, unlinked: the folder went mid-stage
        span = (len(trained), trained[0], trained[-1], skipped, gone) if trained else (0, None, None, (0, 0), gone)
        count, first, last, (overflowed, nonfinite), gone = gather_object([span if acc.is_main_process else None])[0]
        if gone:  # told as a stage where every micro-batch was bad data
            raise TrainingError(
                f"stage {self.name}: its log {metrics.path} is gone: was the stage's folder removed or replaced while "
                "it ran? Nothing more was written; a rerun resumes from the step checkpoints left there"
            )
        if not count:
            why = (  # a short stage of only non-finite steps had been told as one of bad data
                f"every step's loss or gradient was not finite (steps {self.nonfinite}). {self.nonfinite_advice()}"
                if self.nonfinite
                else "every micro-batch was bad data"
            )
            raise TrainingError(
                f"stage {self.name}: no step trained, {why}; nothing was written. Left out: "
                f"{'; '.join(self.report.lines())}"
            )
        if overflowed + nonfinite >= count:  # its final/ would hold the weights it started from, as if trained
            why = [f"fp16's loss scaler skipped {overflowed} (their gradients overflowed)"] if overflowed else []
            why += [f"{nonfinite} had a gradient that was not finite (steps {self.nonfinite})"] if nonfinite else []
            raise TrainingError(
                f"stage {self.name}: no step updated the weights: of its {count} steps, {' and '.join(why)}; nothing "
                f"was written. {self.nonfinite_advice() if nonfinite else 'Train more steps, or use bf16'}"
            )
        final = self.save_final()
        sps, tps, fps = meter.stage_rates()
        tflops = fps / 1e12
        if self.report.counts:
            self.log.warning(
                "stage %s left out %d samples/records: %s",
                self.name,
                self.report.left_out,
                "; ".join(self.report.lines()),
            )
        return StageResult(
            self.name,
            final,
            count,
            first,
            last,
            self.segment_seconds + time.perf_counter() - meter.start,
            sps,
            tps,
            self.skipped,
            acc.num_processes,
            tflops,
            tflops / (self.peak_tflops * acc.num_processes) if self.peak_tflops else None,
            self.peak_memory(),
            self.report.to_dict(),
            list(self.nonfinite),
            stop_at - self.start_step,
        )

    def agreed_verdict(self, problem: str | None, damage: str | None) -> tuple[str | None, str | None]:
        """One verdict on a checkpoint for every rank (the first rank's problem, and its damage by the manifest): each
        rank hashes and loads only the files it reads, so one rank alone may find its own file damaged, and the ranks
        would resume from different steps (a hang or a silent divergence). A collective: every rank calls it at the
        same points for each checkpoint it looks at (once its files are checked, once it is loaded)."""
        if self.acc.num_processes == 1:
            return problem, damage
        verdicts = gather_object([(problem, damage)])
        return (
            next((f"rank {i}: {p}" for i, (p, _) in enumerate(verdicts) if p is not None), None),
            next((d for _, d in verdicts if d is not None), None),
        )

    def logged_losses(self) -> tuple[list[float], tuple[int, int]]:
        """Every finite ``loss/total`` of the stage's ``metrics.jsonl`` (all segments; the main process writes it),
        and how many of those steps updated nothing: fp16's loss scaler skipped them (their gradient overflowed), or
        their gradient was not finite."""
        rows = [r for r in read_rows(self.dir / "metrics.jsonl") if r.get("loss/total") is not None]
        overflowed = sum(bool(r.get("scaler/overflow")) for r in rows)
        return [r["loss/total"] for r in rows], (overflowed, sum(bool(r.get("nonfinite")) for r in rows))

    def merged_report(self) -> DataReport:
        """Every rank's report summed (an all-gather of a small object)."""
        if self.acc.num_processes == 1:
            return self.report
        merged = DataReport()
        for part in gather_object([self.report]):
            merged = merged.merge(part)
        return merged

    def whole_state(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        """The model's whole state dict (None where its own tensors are whole) and the objectives' state, on the main
        process; gathered from the shards under fsdp2 and zero3 (collectives: every rank calls it)."""
        if self.engine is not None:
            full = zero.full_state(self.engine.module, self.acc.process_index)
            if full is not None:
                return (
                    {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")},
                    {k.removeprefix("objectives."): v for k, v in full.items() if k.startswith("objectives.")},
                )
        return sharding.full_state(self.core()), self.objective_modules.state_dict()

    def save_checkpoint(self, step: int, merge: bool = True) -> None:
        """Everything exact resume needs, written by the main process; under fsdp2 the weights and the optimizer
        state are gathered there first, under zero2/zero3 each rank writes its partition of the optimizer state
        (collectives: every rank takes part)."""
        self.check_finite_weights()
        model = self.core()
        model_state, objective_state = self.whole_state()
        path = self.dir / "checkpoints" / f"{ckpt.STEP_PREFIX}{step:06d}"
        if self.engine is not None:
            if self.acc.is_main_process:
                ckpt.atomic_dir(path)
            self.acc.wait_for_everyone()
            partition = zero.optimizer_state(self.optimizer)
            with writing(path):
                torch.save(partition, ckpt.temporary(path) / ckpt.zero_optimizer_file(self.acc.process_index))
            self.acc.wait_for_everyone()
            optimizer_state = None
        else:
            owner = sharding.optimizer_owner(model, self.objective_modules)
            optimizer_state = sharding.optimizer_state(owner, self.optimizer)
        rng = gather_object([ckpt.rng_state()])
        report = self.merged_report() if merge else self.report
        self.report = report if self.acc.is_main_process else DataReport()  # counted in the checkpoint, once
        if self.acc.is_main_process:
            state = {
                "step": step,
                "stage": self.name,
                "skipped": self.skipped,
                "seconds": self.segment_seconds + time.perf_counter() - self.clock,
                "throughput": self.meter.steady_totals(),
                "peak_memory_gib": self.peak_memory(),
                "data": report.to_dict(),
                "nonfinite_steps": list(self.nonfinite),
                **self.run_state(),
            }
            ckpt.save_training_state(
                path,
                model,
                optimizer_state,
                self.scheduler,
                state,
                dict(enumerate(rng)),
                objective_state,
                model_state,
                started=self.engine is not None,
                scaler_state=self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
            )
            ckpt.prune(self.dir, int(self.stage.get("keep_last", 2)), path)
        self.acc.wait_for_everyone()

    def save_final(self) -> Path:
        """Every part trained so far, LoRA merged. Under fsdp2 and zero3 the main process rebuilds the model on the CPU
        from the gathered weights and merges there: the sharded model itself is never changed.

        LoRA merges in fp32 (``merge_lora``): base weights stored in half precision are widened first, since a delta
        added to a bf16 weight would round away (a bf16 weight keeps ~3 significant digits), and the merged part is
        saved in fp32, as every trained part is (``apply_stage`` holds what trains in fp32). The merged base is the
        one the stage started from: a base a ``final/`` gave in fp32 has its unrounded values back first
        (``checkpoint.restore_unrounded``; the stage stored it in half precision), one shipped in bf16 is exact."""
        self.check_finite_weights()
        model = self.core()
        final = self.dir / "final"
        full, _ = self.whole_state()
        sharded = full is not None
        if sharded and self.acc.is_main_process:
            model = build_model(self.cfg.model)
            if self.init:  # what init_from gave in fp32, frozen parts too: loaded unrounded, as setup_model held it
                ckpt.hold_wide_parts(model, self.init)
            apply_stage(model, self.stage.parts, self.stage.get("lora"))  # what trained in fp32: loaded unrounded
            model.load_state_dict(full)
        del full  # copied into the model: held through the merge and the save, rank 0 peaked at 5-6x the model
        if self.acc.is_main_process:
            ckpt.restore_unrounded(model, self.init, self.rounded)
        if not sharded or self.acc.is_main_process:
            merge_lora(model)
        if self.acc.is_main_process:
            ckpt.save_final(final, model, config_yaml(self.cfg), self.saved_parts, self.name, self.trained_from)
        self.acc.wait_for_everyone()
        return final


def refuse_config_held_state(folder: Path, written: Mapping[str, Any], objectives: torch.nn.Module) -> None:
    """Refuse a checkpoint holding an objective tensor that this run takes from its config (a non-persistent buffer,
    such as a fixed temperature): loaded over the config, it would train at the checkpoint's value whatever this run
    says. The generic layout check would only call it a tensor "not trained by this run"."""
    state = {f"objectives.{k}" for k in objectives.state_dict()}
    buffers = {f"objectives.{n}" for n, _ in objectives.named_buffers()}
    held = sorted((buffers - state) & set(written.get("layout", {})))
    if held:
        raise ValueError(
            f"{folder} holds {held}, which this run takes from its config, not from a checkpoint (a fixed value, such "
            "as a contrastive temperature with learnable_temperature=false). Either the checkpoint learned it: resume "
            "with the config it was written with; or an earlier alignlm wrote it, saving fixed values too: finish the "
            "stage with that version, or start it over with resume=never (its checkpoints are set aside, not deleted)"
        )


def check_monitor_strategy(strategy: str, every: int) -> None:
    """The in-training monitor (``monitor.every`` > 0) runs under a strategy whose ranks hold whole weights: its probes
    call the model's parts outside the forward, where under fsdp2 or zero3 the weights are shards. The pipeline asks
    where it resolves the strategy, before the offline sets and prepare steps (``pipeline.resolve_strategy``; the
    refusal came when the first stage set up its optimizer, with exit status 1), the trainer again at set-up."""
    if strategy in ("fsdp2", "zero3") and every:
        raise ConfigError(
            f"monitor.every > 0 is not available with distributed.strategy={strategy} (the probes call the "
            "model's parts outside its forward, where their weights are shards): set monitor.every=0, or probe "
            "the checkpoints afterwards with alignlm eval"
        )


def checkpointing_parts(setting: Any, key: str = "stage.gradient_checkpointing") -> list[str]:
    """The parts ``gradient_checkpointing`` names: false (none), true (the LLM), or a list of llm and vision; the
    config check before the first stage and the trainer read it here."""
    if isinstance(setting, bool):
        return ["llm"] if setting else []
    parts = list(setting) if OmegaConf.is_list(setting) or isinstance(setting, (list, tuple)) else None
    unknown = None if parts is None else [p for p in parts if p not in ("llm", "vision")]
    if unknown is None or unknown:
        raise ConfigError(
            f"{key}={setting!r}: true, false, or a list of parts; checkpointing applies to llm and vision, not "
            f"{unknown if unknown else setting!r}"
        )
    return parts


def enable_checkpointing(model: AlignLM, setting: Any) -> None:
    """``stage.gradient_checkpointing``: false, true (the LLM), or a list of parts (``[llm, vision]``)."""
    if not setting:
        return
    for part in checkpointing_parts(setting):
        checkpointable(model, part, "stage.gradient_checkpointing").gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )


def checkpointable(model: AlignLM, part: str, key: str) -> Any:
    """The transformers model of ``part`` that checkpoints its layers; a part that cannot (EfficientNet-Lite, the
    offline dual encoder's tower) is refused, naming ``key``: the start-up checks ask first, before any stage trains."""
    module = lora_base(getattr(model, part))  # under a LoRA part's peft wrapper, whose .model is the part itself
    inner = getattr(module, "model", module)  # an HFVisionTower wraps the transformers model
    if not hasattr(inner, "gradient_checkpointing_enable"):
        raise ValueError(f"{key}: model.{part} ({type(inner).__name__}) cannot checkpoint")
    return inner


def compile_llm_layers(model: AlignLM, checkpointed: bool = False) -> None:
    """``stage.compile``: each LLM decoder layer through ``torch.compile`` (dynamic shapes: packed rows vary).

    ``checkpointed``: the layers are checkpointed too. A layer's forward then runs inside checkpointing, which Dynamo
    traces only where the forward has no side effect outside it, or where it may skip replaying one in the backward.
    The layers' only such effect is a context variable that routes hub kernels (the ``kernels`` package, which
    transformers' Llama-like layers are decorated with), set and reset within the one call: skipping its replay
    changes nothing. Without that setting every layer broke the graph and nothing was compiled, without a word."""
    layers = getattr(model.llm.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError("stage.compile: the LLM has no decoder .layers to compile")
    if checkpointed:
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile(dynamic=True)


# what the interpreter holds frozen of itself (CPython 3.12.1: 375 tuples of the built-in types), not a caller's freeze:
# read as one, workers had been forked unfrozen on 3.12. A caller's gc.freeze() before alignlm is imported counts as
# the interpreter's, and start_workers' unfreeze undoes it (freeze after the import to keep it)
FROZEN_AT_IMPORT = gc.get_freeze_count()


def start_workers(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)``, its worker processes forked with the collector's objects frozen, so a worker's collections
    never write the headers of what it inherited (the dataset's records, the model's Python side) and those pages stay
    shared with the rank: on 100k packed LLaVA-665k-like records a worker's private copy grew to 80 MB after an eighth
    of an epoch and one full collection, 4 MB frozen. The rank unfreezes at once, so its own cycles (a finished stage's
    modules) are still collected; the workers keep the frozen state they were forked with."""
    if not loader.num_workers or gc.get_freeze_count() > FROZEN_AT_IMPORT:  # frozen by the caller: left as it is
        return iter(loader)
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


def ignore_signal(name: str, worker_id: int) -> None:
    """A data-loader worker's start: the signal ``name`` is for the rank, not for its workers."""
    signal.signal(getattr(signal, name), signal.SIG_IGN)


class StopTraining(RuntimeError):
    """Raised when ``stop_after_steps``, the stop signal or the stop file ends a process early, after a checkpoint was
    written (or between stages, with nothing to write)."""


STOP_WHY = "distributed.stop_signal or stop_file"  # what a stop's message says asked for it


class StopRequest:
    """A clean stop asked for by ``distributed.stop_signal`` (SIGUSR1 by default) to any rank, or by
    ``distributed.stop_file``; a file works where a signal cannot reach the ranks through the launchers (SLURM's batch
    shell). The pipeline holds the signal's handler for the whole run (``handling``): held around a stage's step loop
    alone, the signal's default action killed the rank while it wrote the stop's checkpoint or a ``final/``, set up the
    next stage or evaluated, and a request at a stage's last step was forgotten. A request stays until the run stops on
    it, and a repeated signal only asks again. Every rank stops at the same safe point: the next fetch of logged values
    inside a stage (the flag rides on its all-reduce: ``Trainer.fetch``), or after a stage, before the next stage or
    the evaluation (``agreed``)."""

    def __init__(self, dist: Mapping[str, Any]) -> None:
        """``dist``: the ``distributed`` config (its ``stop_signal`` checked by ``check_config``)."""
        self.signal_name = dist.get("stop_signal")
        self.file = Path(dist["stop_file"]) if dist.get("stop_file") else None
        self.received = False  # the signal reached this process

    def asked(self) -> bool:
        """Whether this rank was asked to stop: it received the signal, or sees the stop file."""
        return self.received or bool(self.file is not None and self.file.exists())

    def agreed(self, acc: Accelerator) -> bool:
        """Whether any rank was asked to stop: a collective, which every rank calls at the same point."""
        if acc.num_processes == 1:
            return self.asked()
        asked = torch.full((1,), float(self.asked()), device=acc.device)
        return bool(acc.reduce(asked, "sum").item() > 0)

    def served(self, acc: Accelerator) -> None:
        """The run stops on the request: the main process removes the stop file, so that the rerun goes on."""
        if self.file is not None and acc.is_main_process:
            self.file.unlink(missing_ok=True)

    @contextlib.contextmanager
    def handling(self) -> Iterator[StopRequest]:
        """The signal only sets the request while inside; the handler before it is restored at the end, however the
        run ends. Off where the signal is null, or outside the main thread (where Python cannot set a handler)."""
        if not self.signal_name or threading.current_thread() is not threading.main_thread():
            yield self
            return
        number = getattr(signal, str(self.signal_name))

        def receive(signum: int, frame: Any) -> None:
            self.received = True

        previous = signal.signal(number, receive)
        try:
            yield self
        finally:
            signal.signal(number, previous)


class Terminated(RuntimeError):
    """SIGTERM reached a rank inside the step loop (raised by its handler, so the rank and step are logged)."""


class TrainingError(RuntimeError):
    """A stage that cannot go on: it diverged (non-finite steps) or had no usable data; nothing bad was written."""


def sample_relations(model: AlignLM, objectives: Mapping[str, tuple[Objective, float]]) -> list[str]:
    """What depends on which samples share one rank's micro-batch, by config key: an objective that is a mean over
    the micro-batch (neither normalised over the whole step, as the LM loss is, nor gathered over the ranks): a
    contrast, a transport, a mean over labelled tokens or over pairs; a connector whose output or losses relate them
    (routing, losses over the micro-batch's image tokens); a trainable tower with batch normalisation (each
    micro-batch its own statistics)."""
    relating = [
        f"objectives.{key}"
        for key, (objective, _) in objectives.items()
        if not getattr(objective, "token_normalized", False) and not getattr(objective, "global_batch", False)
    ]
    if getattr(model.connector, "relates_samples", False):
        relating.append("model.connector")
    if "vision" not in model.frozen_parts and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.vision.modules()
    ):
        relating.append("model.vision")
    return relating


def rank_batches_kept(order: StepSampler, relating: Sequence[str], log: Any, stage: str) -> StepSampler:
    """``order`` with its micro-steps unsorted where ``step`` grouping would change a number: sorted across the ranks,
    each rank's micro-batch is a band of lengths (the longest on rank 0), and what ``relating`` computes on a rank's
    micro-batch alone changed with it (a contrastive loss without gathering drew its negatives from a band). One rank,
    or nothing relating the samples, keeps the sort: it moves samples only within the micro-batch, or between ranks
    whose losses sum alike."""
    if order.grouping != "step" or order.lengths is None or order.world == 1 or not relating:
        return order
    log.info(
        "stage %s: micro-steps not sorted by length across the %d ranks (group_by_length=step): %s compute on each "
        "rank's micro-batch alone, which the sort would change; group_by_length=band groups anyway",
        stage,
        order.world,
        ", ".join(relating),
    )
    return dataclasses.replace(order, lengths=None)


def length_grouping(data: Any) -> str | None:
    """How a stage's batches are grouped by length (``data.group_by_length``: ``step``, ``band``, or false for none;
    ``true`` is ``band``, what it meant before ``step`` existed, so a run started then resumes with its own order)."""
    value = data.get("group_by_length", "step")
    return "band" if value is True else value or None


def stage_done(cfg: DictConfig, name: str) -> bool:
    """A stage whose ``final/`` exists whole is complete (resume=auto skips it, once the pipeline has checked that it
    was trained from this run's settings and files: ``pipeline.check_finished_stages``)."""
    final = _final_to_keep(cfg, name)
    return final is not None and ckpt.final_intact(final) is None


def damaged_final(cfg: DictConfig, name: str) -> str | None:
    """What is wrong with a stage's ``final/`` that is there but not whole (a file cut short or empty: a node lost
    during or after its write), so the stage is trained again from its step checkpoints; None otherwise. Every rerun
    had crashed loading it, naming no file."""
    final = _final_to_keep(cfg, name)
    return None if final is None else ckpt.final_intact(final)


def _final_to_keep(cfg: DictConfig, name: str) -> Path | None:
    """The stage's ``final/`` where it holds weights and the run may keep it (not ``resume=never``)."""
    final = Path(cfg.output_dir) / cfg.run_name / name / "final"
    return final if cfg.resume != "never" and (final / "model.safetensors").exists() else None


def summarize(result: StageResult) -> str:
    """The end-of-stage table."""
    rows: dict[str, Any] = {
        "steps": result.steps,
        "loss first -> last": f"{result.first_loss:.4f} -> {result.last_loss:.4f}",
        "time (s)": round(result.seconds, 1),
        "samples/s (steady)": result.samples_per_s,
        "tokens/s (steady, real tokens)": result.tokens_per_s,
        "model TFLOP/s": result.tflops,
    }
    if result.mfu is not None:
        rows["MFU"] = f"{100 * result.mfu:.1f} %"
    if result.peak_memory_gib is not None:
        rows["peak memory (GiB)"] = result.peak_memory_gib
    rows["skipped samples"] = result.skipped
    for line in DataReport.from_dict(result.data).lines():
        cause, _, rest = line.partition(": ")
        rows[f"  {cause}"] = rest
    if result.nonfinite_steps:
        rows["non-finite steps (skipped)"] = str(result.nonfinite_steps)
    rows["final"] = str(result.final_dir)
    return summary_table(f"stage {result.name}", rows)
