"""One training stage on accelerate: the loop is plain code, readable in one screen (``Trainer.fit``).

Exactness choices, so that a resumed run and a data-parallel run reproduce a plain single-process run:
- the LM loss of every micro-batch is a *sum* divided by the supervised-token count of the whole global
  step (all micro-batches on all ranks), so accumulation and DDP averaging give one big batch's gradient;
- data order comes from ``StepSampler`` (a function of seed and step), model RNG is checkpointed per rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from alignlm.config import instantiate
from alignlm.constants import IGNORE_INDEX
from alignlm.data.build import build_dataset
from alignlm.data.collate import Collator
from alignlm.models.build import build_model
from alignlm.models.mllm import AlignLM
from alignlm.objectives.base import Objective, check_batch
from alignlm.training import checkpoint as ckpt
from alignlm.training.logging import MetricsLogger, get_logger, summary_table
from alignlm.training.monitor import AlignmentMonitor
from alignlm.training.optim import build_optimizer
from alignlm.training.sampler import StepSampler
from alignlm.training.stages import apply_stage, count_params, merge_lora, trainable_parts


@dataclass
class StageResult:
    """What a finished stage reports to the pipeline summary."""

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
    skipped_examples: list[str] = field(default_factory=list)


def build_objectives(stage: Mapping[str, Any]) -> dict[str, tuple[Objective, float]]:
    """Objectives of a stage with their weights: ``total = sum(weight * loss)``."""
    objectives = {}
    for key, node in (stage.get("objectives") or {}).items():
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        weight = float(node.pop("weight", 1.0))
        obj = instantiate(node, f"stage.objectives.{key}")
        if not isinstance(obj, Objective):
            raise TypeError(f"stage.objectives.{key} built a {type(obj).__name__}, not an alignlm Objective")
        objectives[key] = (obj, weight)
    if not objectives:
        raise ValueError("stage.objectives is empty; add at least objective lm")
    return objectives


class Trainer:
    """Trains one stage of ``cfg.stages[name]`` and writes its checkpoints and ``final/``."""

    def __init__(self, cfg: DictConfig, name: str, accelerator: Accelerator) -> None:
        self.cfg, self.name, self.acc = cfg, name, accelerator
        self.stage = cfg.stages[name]
        self.dir = Path(cfg.output_dir) / cfg.run_name / name
        self.log = get_logger("alignlm", accelerator.process_index)

    def setup(self) -> None:
        cfg, stage, acc = self.cfg, self.stage, self.acc
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        init = ckpt.resolve_init(stage.get("init_from"), Path(cfg.output_dir) / cfg.run_name, cfg.stages)
        self.prev_parts = ckpt.load_init(model, init) if init else []
        apply_stage(model, stage.parts, stage.get("lora"))
        if stage.get("gradient_checkpointing"):
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.dataset = build_dataset(stage.data, model, cfg.seed, for_generation=False)
        self.order = StepSampler(
            len(self.dataset),
            int(stage.per_device_batch_size),
            acc.num_processes,
            acc.process_index,
            int(stage.grad_accum),
            int(cfg.seed),
            total_steps=0,
            lengths=self.dataset.length_estimates() if stage.data.get("group_by_length") else None,
        )
        self.total_steps = (
            int(stage.max_steps)
            if stage.get("max_steps")
            else int(math.ceil(float(stage.epochs) * self.order.steps_per_epoch))
        )
        self.objectives = build_objectives(stage)
        self.monitor = AlignmentMonitor(cfg.get("monitor"), model)
        for obj, _ in self.objectives.values():
            obj.setup(model, self.dataset)
        # objectives by config key: their parameters train in their own optimizer group, their state resumes
        self.objective_modules = torch.nn.ModuleDict({k: o for k, (o, _) in self.objectives.items()}).to(acc.device)
        self.objective_params = [p for p in self.objective_modules.parameters() if p.requires_grad]
        optimizer, self.scheduler = build_optimizer(model, stage, self.total_steps, self.objective_params)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.start_step, self.skipped = self._maybe_resume()
        trainable, total = count_params(model)
        # Model FLOPs per token: forward through every weight, activation gradients back through the LLM,
        # weight gradients for what trains (the usual 6N when everything trains). An estimate for MFU.
        self.flops_per_token = 2 * total + 2 * sum(p.numel() for p in model.llm.parameters()) + 2 * trainable
        self.log.info(
            "stage %s: %d steps of %d samples (global batch), %s trainable of %s params, %d processes",
            self.name,
            self.total_steps,
            self.order.global_batch,
            f"{trainable:,}",
            f"{total:,}",
            acc.num_processes,
        )

    def _maybe_resume(self) -> tuple[int, int]:
        if self.cfg.resume == "never" or not ckpt.step_dirs(self.dir):
            return 0, 0
        last = ckpt.step_dirs(self.dir)[-1]
        state = ckpt.load_training_state(
            last,
            self.acc.unwrap_model(self.model),
            self.optimizer,
            self.scheduler,
            self.acc.process_index,
            self.objective_modules,
        )
        self.log.info("resumed stage %s from %s (step %d)", self.name, last, state["step"])
        return int(state["step"]), int(state.get("skipped", 0))

    def loss(self, batch: dict[str, Any], n_micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """Weighted sum of objectives (plus the connector's auxiliary losses) for one micro-batch."""
        model = self.acc.unwrap_model(self.model)
        needs_hidden = any(o.needs_hidden_states for o, _ in self.objectives.values())
        out = self.model(batch, output_hidden_states=needs_hidden)
        total = out.lm_loss.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        for key, (obj, weight) in self.objectives.items():
            term = obj(batch, out, model)
            total = total + weight * term.loss * (1.0 if obj.token_normalized else 1.0 / n_micro)
            if not obj.token_normalized:
                logs[f"loss/{key}"] = term.loss.detach() / n_micro
            logs.update({f"{key}/{k}": v.detach() / n_micro for k, v in term.metrics.items()})
        for key, aux in out.aux_losses.items():
            total = total + aux / n_micro
            logs[f"aux/{key}"] = aux.detach() / n_micro
        logs.update({f"connector/{k}": v.detach() / n_micro for k, v in out.metrics.items()})
        return total, logs, out

    def fit(self) -> StageResult:
        self.setup()
        acc, st = self.acc, self.stage
        metrics = MetricsLogger(
            self.dir / "metrics.jsonl",
            self.cfg.logging.get("wandb"),
            f"{self.cfg.run_name}/{self.name}",
            OmegaConf.to_container(self.cfg, resolve=True),
            acc.is_main_process,
            self.start_step,
        )
        if acc.is_main_process:  # what eval needs to rebuild a step checkpoint before final/ exists
            (self.dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        loader = DataLoader(
            self.dataset,
            batch_sampler=dataclasses.replace(self.order, total_steps=self.total_steps, start_step=self.start_step),
            collate_fn=Collator(self.dataset.tokenizer.pad_token_id, hooks=self.dataset.hooks),
            num_workers=int(st.data.get("num_workers", 0)),
        )
        batches = iter(loader)
        accum, max_norm = int(st.grad_accum), float(st.get("max_grad_norm", 1.0))
        stop_at = min(self.total_steps, self.start_step + int(self.cfg.stop_after_steps or self.total_steps))
        bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            desc=self.name,
            disable=not acc.is_main_process,
            dynamic_ncols=True,
        )
        losses: list[float] = []
        t0, samples, tokens = time.perf_counter(), 0, 0
        self.model.train()
        for step in range(self.start_step, stop_at):
            micro = [next(batches) for _ in range(accum)]
            self.skipped += int(
                acc.reduce(torch.tensor(sum(len(b["skipped"]) for b in micro), device=acc.device), "sum")
            )
            micro = [send_to_device(b, acc.device) for b in micro if "input_ids" in b]
            if int(acc.reduce(torch.tensor(accum - len(micro), device=acc.device), "sum")):
                # every sample of a micro-batch was skipped on some rank: skip the step on all ranks, in step
                self.log.warning("step %d skipped: a whole micro-batch was bad data (see the skipped count)", step + 1)
                bar.update(1)
                continue
            n_items = acc.reduce(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro).to(acc.device), "sum")
            if step == self.start_step:
                check_batch(
                    {f"objective {k}": o.requires_batch_keys for k, (o, _) in self.objectives.items()}
                    | {"the model's extra parts": self.acc.unwrap_model(self.model).requires_batch_keys},
                    micro[0],
                )
            lm_sum, total_sum, logs = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device), {}
            for i, batch in enumerate(micro):
                batch["num_items_in_batch"] = n_items.float() / acc.num_processes
                sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.model)
                with sync, acc.autocast():
                    total, step_logs, out = self.loss(batch, len(micro))
                    acc.backward(total)
                lm_sum += out.lm_loss_sum
                total_sum += total.detach()
                for k, v in step_logs.items():
                    logs[k] = logs.get(k, 0.0) + v
            if acc.num_processes > 1:  # objective parameters live outside the DDP model: average their gradients here
                for p in self.objective_params:
                    p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), "mean")
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm) if max_norm > 0 else None
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            # every logged value is the global (all ranks, all micro-batches) figure
            row = {
                "loss/total": float(acc.reduce(total_sum, "mean")),
                "loss/lm": float(acc.reduce(lm_sum, "sum") / n_items.clamp(min=1)),
            }
            row.update({k: float(acc.reduce(torch.as_tensor(v, device=acc.device), "mean")) for k, v in logs.items()})
            row["lr"] = self.scheduler.get_last_lr()[-1]
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            samples += int(acc.reduce(torch.tensor(sum(len(b["ids"]) for b in micro), device=acc.device), "sum"))
            tokens += int(acc.reduce(sum(b["attention_mask"].sum() for b in micro).to(acc.device), "sum"))
            elapsed = time.perf_counter() - t0
            row.update(
                {
                    "samples_per_s": samples / elapsed,
                    "tokens_per_s": tokens / elapsed,
                    "skipped": self.skipped,
                    "tflops": tokens * self.flops_per_token / elapsed / 1e12,
                }
            )
            if self.cfg.logging.get("peak_tflops"):
                row["mfu"] = row["tflops"] / (float(self.cfg.logging.peak_tflops) * acc.num_processes)
            losses.append(row["loss/total"])
            row.update(self.monitor(step + 1, acc.unwrap_model(self.model)))
            metrics.log(row, step + 1)
            bar.update(1)
            bar.set_postfix(
                loss=f"{row['loss/total']:.4f}", sps=f"{row['samples_per_s']:.1f}", tps=f"{row['tokens_per_s']:.0f}"
            )
            if int(st.save_every) and (step + 1) % int(st.save_every) == 0 and step + 1 < self.total_steps:
                self.save_checkpoint(step + 1)
        bar.close()
        metrics.close()
        if stop_at < self.total_steps:
            self.save_checkpoint(stop_at)
            raise StopTraining(
                f"stopped after step {stop_at} of {self.total_steps} (stop_after_steps); rerun to resume"
            )
        final = self.save_final()
        elapsed = time.perf_counter() - t0
        return StageResult(
            self.name,
            final,
            len(losses),
            losses[0] if losses else float("nan"),
            losses[-1] if losses else float("nan"),
            elapsed,
            samples / max(elapsed, 1e-9),
            tokens / max(elapsed, 1e-9),
            self.skipped,
            acc.num_processes,
            self.dataset.malformed[:3],
        )

    def save_checkpoint(self, step: int) -> None:
        rng = gather_object([ckpt.rng_state()])
        if self.acc.is_main_process:
            state = {"step": step, "stage": self.name, "skipped": self.skipped, "world": self.acc.num_processes}
            path = self.dir / "checkpoints" / f"{ckpt.STEP_PREFIX}{step:06d}"
            ckpt.save_training_state(
                path,
                self.acc.unwrap_model(self.model),
                self.optimizer,
                self.scheduler,
                state,
                dict(enumerate(rng)),
                self.objective_modules,
            )
            ckpt.prune(self.dir, int(self.stage.get("keep_last", 2)))
        self.acc.wait_for_everyone()

    def save_final(self) -> Path:
        model: AlignLM = self.acc.unwrap_model(self.model)
        merge_lora(model)
        parts = [p for p in model.PARTS if p in set(self.prev_parts) | set(trainable_parts(self.stage.parts))]
        final = self.dir / "final"
        if self.acc.is_main_process:
            ckpt.save_final(final, model, OmegaConf.to_yaml(self.cfg, resolve=True), parts)
        self.acc.wait_for_everyone()
        return final


class StopTraining(RuntimeError):
    """Raised when ``stop_after_steps`` ends a process early, after a checkpoint was written."""


def stage_done(cfg: DictConfig, name: str) -> bool:
    """A stage whose ``final/`` exists is complete (resume=auto skips it)."""
    final = Path(cfg.output_dir) / cfg.run_name / name / "final"
    return cfg.resume != "never" and (final / "model.safetensors").exists()


def summarize(result: StageResult) -> str:
    """The end-of-stage table."""
    return summary_table(
        f"stage {result.name}",
        {
            "steps": result.steps,
            "loss first -> last": f"{result.first_loss:.4f} -> {result.last_loss:.4f}",
            "time (s)": round(result.seconds, 1),
            "samples/s": result.samples_per_s,
            "tokens/s": result.tokens_per_s,
            "skipped samples": result.skipped,
            "final": str(result.final_dir),
        },
    )
