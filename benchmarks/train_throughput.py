"""Training throughput: alignlm's training step against a plain transformers Llava loop, same weights, same samples.

Both sides train the same model (alignlm's, exported weight for weight to ``LlavaForConditionalGeneration`` for the
peer) on the same LLaVA-like samples, one after the other in one process, and the script prints a table and JSON:
real (non-padding) tokens/s, samples/s, peak memory, model TFLOP/s and MFU, and alignlm / peer.

- Samples: 576 image tokens (a CLIP ViT-L/14-336 tower) plus text whose length follows a LLaVA-665k-like
  distribution for ``finetune`` (multi-turn, answers supervised, a lognormal long tail up to 2k tokens) or
  LLaVA-558k-like captions for ``pretrain`` (~55 tokens). Token ids are random below the vocabulary size.
- Both sides get the same batches, of similar length as alignlm's sampler groups them (runs of 16 batches sorted by
  length).
- alignlm: its own ``Trainer`` (``setup_model``, ``setup_optimization``, ``collator``, ``step``) with the stage's
  default settings (packed rows where the attention kernel isolates them for free, else padded; chunked LM loss over
  supervised positions; bf16 storage of frozen parts; fused AdamW; no host sync in the step); ``--cached-features``
  feeds the frozen tower's features as the feature cache would.
- peer: the loop a user writes in an afternoon: ``LlavaForConditionalGeneration`` on the device, its trained parts
  in float32 and its frozen ones in bf16 under bf16 autocast (as alignlm stores them), ``torch.optim.AdamW`` over the
  trained parts with the stage's learning rates, betas, weight decay and fused kernel, each batch padded to its
  longest sample, ``labels=`` to the model (its loss over every position), ``loss.backward()``, the gradient clipped
  to the stage's ``max_grad_norm``, ``optimizer.step()``.
- MFU = model FLOPs per second / peak dense bf16 FLOP/s (989 TFLOP/s on an H100/H200), model FLOPs by
  ``training/throughput.py``'s formula: 2 x non-embedding params x 3 trained, 2 frozen with gradients flowing back
  through them, 1 otherwise, per real token, but the LM head's per supervised position (alignlm computes logits only
  there), plus causal attention 12 x layers x width x the positions a token attends to on average over the timed
  samples; the same formula for both sides (the peer's head products at unsupervised positions are no model FLOPs).
- Cached features (``--cached-features``): the tower's features are computed before the timed steps, as the
  feature cache computes them before a stage (batches of ``--batch`` images, timed after one warm-up batch: the
  tower and the copy to the host; the cache's decoding, finiteness check, shard writes and reads are left out, so
  the build's cost is a lower bound). The ratio per step leaves that build out; ``ratio_tokens_per_s_one_epoch``
  charges each sample its image's build, what one epoch pays (LLaVA's stage 1 is one epoch; a cache pays off when
  several runs read it).
- Stage 1 (``pretrain``) also projects LLaVA-1.5's 558k captions, one epoch, from alignlm's samples/s (with cached
  features, the cache's build added): the hours on this one GPU, and on ``--gpus`` (default 8, LLaVA-1.5's 3.5 h
  were on 8 A100s) at ideal scaling, fewer hours than that many GPUs would take.

    python benchmarks/train_throughput.py --size tiny --steps 3 --warmup 1 --batch 2      # CPU, seconds
    python benchmarks/train_throughput.py --size 1.1b --stage finetune --vocab 32000 --batch 16
    python benchmarks/train_throughput.py --size 1.1b --stage pretrain --cached-features --batch 32
    python benchmarks/train_throughput.py --size 7b --stage pretrain --batch 32 --no-peer
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from alignlm.config import compose
from alignlm.constants import IGNORE_INDEX
from alignlm.export.hf_llava import to_llava
from alignlm.models.mllm import AlignLM
from alignlm.training.stages import decays
from alignlm.training.throughput import (
    attended_positions,
    head_flops_per_target,
    model_flops_per_token,
    peak_tflops,
)
from alignlm.training.trainer import Trainer

CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}
SIZES: dict[str, dict[str, Any]] = {  # LLM shapes (Llama architecture) and the tower they are paired with
    "tiny": {"llm": {}, "vision": {}},
    "0.5b": {
        "llm": {
            "hidden_size": 896,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "intermediate_size": 4864,
        },
        "vision": CLIP_L_336,
    },  # Qwen2.5-0.5B's shape
    "1.1b": {
        "llm": {
            "hidden_size": 2048,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "intermediate_size": 5632,
        },
        "vision": CLIP_L_336,
    },  # TinyLlama-1.1B's shape
    "7b": {
        "llm": {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "intermediate_size": 11008,
        },
        "vision": CLIP_L_336,
    },  # Vicuna-7B / LLaVA-1.5-7B's shape
}
PARTS = {
    "finetune": "{vision: frozen, connector: full, llm: full}",
    "pretrain": "{vision: frozen, connector: full, llm: frozen}",
}


def shape_overrides(size: str, vocab: int) -> list[str]:
    """Hydra overrides that resize the tiny model's parts to ``size`` with ``vocab`` embedding and LM-head rows."""
    shape = SIZES[size]
    overrides = [f"model.llm.{k}={v}" for k, v in shape["llm"].items()]
    overrides += [f"model.vision.config.{k}={v}" for k, v in shape["vision"].items()]
    return overrides + [f"model.llm.embedding_rows={vocab}", "model.llm.max_position_embeddings=4096"]


def config(size: str, stage: str, vocab: int, batch: int, steps: int, device: str, packing: str = "auto"):
    """The alignlm config of one benchmark point: the tiny parts resized to ``size``."""
    overrides = shape_overrides(size, vocab) + [
        f"run=[{stage}]",
        f"stages.{stage}.parts={PARTS[stage]}",
        f"stages.{stage}.init_from=null",
        f"stages.{stage}.max_steps={steps}",
        f"stages.{stage}.per_device_batch_size={batch}",
        f"stages.{stage}.data.packing={packing}",
        "output_dir=/tmp/alignlm_bench",
        "mixed_precision=" + ("bf16" if device == "cuda" else "no"),
    ]
    return compose(overrides)


def text_lengths(stage: str, n: int, rng: np.random.Generator) -> list[list[tuple[int, bool]]]:
    """Per sample, its text after the image as (length, supervised) segments."""
    out = []
    for _ in range(n):
        if stage == "pretrain":  # one caption (LLaVA-558k: ~55 tokens with the template)
            out.append([(int(rng.integers(2, 6)), False), (int(np.clip(rng.normal(50, 15), 8, 150)), True)])
            continue
        turns = 1 + min(int(rng.poisson(2.0)), 9)  # LLaVA-665k: mostly a few turns, some many
        total = int(np.clip(np.exp(rng.normal(math.log(150), 0.9)), 24, 2048 - 576 - 8))  # long tail to 2k
        share = rng.dirichlet(np.ones(2 * turns)) * total
        segments = [(max(2, int(s)), i % 2 == 1) for i, s in enumerate(share)]  # question, answer, question, ...
        out.append(segments)
    return out


def make_samples(model: AlignLM, stage: str, n: int, seed: int) -> list[dict[str, Any]]:
    """alignlm samples (BOS, 576 image tokens, text segments; answers supervised), each with its image."""
    rng = np.random.default_rng(seed)
    vocab = model.llm.get_input_embeddings().num_embeddings
    size, m = model.image_spec.size, model.num_image_tokens
    bos = model.tokenizer.bos_token_id
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, segments in enumerate(text_lengths(stage, n, rng)):
        ids = [torch.tensor([bos]), torch.full((m,), model.image_token_id)]
        labels = [torch.tensor([IGNORE_INDEX]), torch.full((m,), IGNORE_INDEX)]
        for length, supervised in segments:
            tokens = torch.from_numpy(rng.integers(10, vocab, length))
            tokens[tokens == model.image_token_id] = 10  # text never holds the image placeholder
            ids.append(tokens)
            labels.append(tokens.clone() if supervised else torch.full((length,), IGNORE_INDEX))
        sample = {
            "id": f"s{i}",
            "input_ids": torch.cat(ids),
            "labels": torch.cat(labels),
            "n_images": 1,
            "pixel_values": torch.randn(1, 3, size, size, generator=g),
        }
        samples.append(sample)
    return samples


def cache_features(model: AlignLM, samples: list[dict[str, Any]], batch: int) -> float:
    """Give each sample its image's features in place of the image, as the feature cache stores them (the frozen
    tower's output, batches of ``batch`` images under bf16 autocast on CUDA, copied to the host), and return the
    seconds per image this build took, timed after one warm-up batch (the whole build when it is one batch)."""
    device = next(model.vision.parameters()).device
    chunks = [samples[i : i + batch] for i in range(0, len(samples), batch)]
    seconds, timed = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for k, chunk in enumerate(chunks):
            sync(device)
            start = time.perf_counter()
            pixels = torch.cat([s["pixel_values"] for s in chunk]).to(device, non_blocking=True)
            features = model.vision(pixels).cpu()
            sync(device)
            if k > 0 or len(chunks) == 1:
                seconds, timed = seconds + time.perf_counter() - start, timed + len(chunk)
            for s, f in zip(chunk, features):
                s["image_embeds"], s["pixel_values"] = f[None], None
    return seconds / timed


def pinned(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors in page-locked memory on CUDA (a copy from pageable memory would wait for the device)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run_step, batches: list[Any], warmup: int, device: torch.device) -> tuple[float, list[int]]:
    """Seconds for the batches after ``warmup`` (each step fed one batch), and each timed step's index."""
    for b in batches[:warmup]:
        run_step(b)
    sync(device)
    start = time.perf_counter()
    for b in batches[warmup:]:
        run_step(b)
    sync(device)
    return time.perf_counter() - start, list(range(warmup, len(batches)))


def grouped(samples: list[dict[str, Any]], batch: int, seed: int) -> list[list[dict[str, Any]]]:
    """Batches of similar length, as alignlm's sampler makes them (runs of 16 batches sorted, then shuffled)."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, len(samples), batch * 16):
        run_ = sorted(samples[start : start + batch * 16], key=lambda s: -len(s["input_ids"]))
        out += [run_[i : i + batch] for i in range(0, len(run_), batch)]
    return [out[i] for i in rng.permutation(len(out))]


def bench_alignlm(
    stage: str,
    chunks: list[list[dict[str, Any]]],
    warmup: int,
    trainer: Trainer,
    flops: tuple[float, float],
) -> dict[str, Any]:
    """alignlm's own step and collator, default settings; ``flops``: model FLOPs per real token (the LM head's left
    out) and per supervised position (the head's)."""
    acc = trainer.acc
    collate = trainer.collator()
    batches = [pinned(collate(c), acc.device) for c in chunks]  # as the data loader hands them over on CUDA
    step = {"i": 0}

    def run_step(b: dict[str, Any]) -> None:
        step["i"] += 1
        trainer.step([b], step["i"])

    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    seconds, timed = time_steps(run_step, batches, warmup, acc.device)
    result = summarise("alignlm", seconds, [chunks[i] for i in timed], acc.device, flops)
    result["packed"] = collate.pack_length is not None
    return result


def bench_peer(
    model: AlignLM,
    stage: str,
    settings: Any,
    chunks: list[list[dict[str, Any]]],
    warmup: int,
    device: torch.device,
    flops: tuple[float, float],
) -> dict[str, Any]:
    """The plain transformers loop on the same weights and the same batches (the tower always runs), with the
    stage's optimizer ``settings`` (its ``lr`` per part, ``betas``, ``weight_decay``, ``max_grad_norm``) and its frozen
    parts stored in bf16 under bf16 autocast, as alignlm stores them: in fp32 they had cost the peer a cast of every
    frozen weight at each use and gigabytes of memory alignlm does not spend."""
    trainable = {"finetune": ("connector", "llm"), "pretrain": ("connector",)}[stage]
    with torch.device(device):  # the peer's copy made on the device, then every weight copied from alignlm's
        hf = to_llava(model.float()).train()
    train_prefixes = {"connector": ("model.multi_modal_projector.",), "llm": ("model.language_model.", "lm_head.")}
    half = device.type == "cuda"  # bf16 autocast there, as alignlm's side
    decay = float(settings.get("weight_decay", 0.0))
    groups = []
    for part in trainable:  # per part its rate; biases and norm weights undecayed, as alignlm's groups
        named = [(n, p) for n, p in hf.named_parameters() if n.startswith(train_prefixes[part])]
        for decayed in (True, False):
            params = [p for n, p in named if decays(n, p) == decayed]
            groups.append({"params": params, "lr": float(settings.lr[part]), "weight_decay": decay if decayed else 0.0})
    trained = {id(p) for g in groups for p in g["params"]}
    for p in hf.parameters():
        p.requires_grad_(id(p) in trained)
        if half and id(p) not in trained:
            p.data = p.data.to(torch.bfloat16)
    opt = torch.optim.AdamW(
        groups,
        betas=tuple(settings.get("betas", (0.9, 0.999))),
        eps=1e-8,
        fused=half or None,
    )
    max_norm = float(settings.get("max_grad_norm", 1.0))
    pad = model.tokenizer.pad_token_id
    batches = []
    for c in chunks:
        length = max(len(s["input_ids"]) for s in c)
        ids = torch.full((len(c), length), pad)
        labels = torch.full((len(c), length), IGNORE_INDEX)
        mask = torch.zeros((len(c), length), dtype=torch.long)
        for i, s in enumerate(c):
            ids[i, : len(s["input_ids"])] = s["input_ids"]
            labels[i, : len(s["labels"])] = s["labels"]
            mask[i, : len(s["input_ids"])] = 1
        pixels = torch.cat([s["pixel_values"] for s in c]) if c[0].get("pixel_values") is not None else None
        batches.append(
            pinned({"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}, device)
        )
    del model
    gc.collect()

    def run_step(b: dict[str, Any]) -> None:
        b = {k: v.to(device, non_blocking=True) if v is not None else None for k, v in b.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = hf(**b).loss
        loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, timed = time_steps(run_step, batches, warmup, device)
    return summarise("transformers Llava (peer)", seconds, [chunks[i] for i in timed], device, flops)


def summarise(
    name: str,
    seconds: float,
    chunks: list[list[dict[str, Any]]],
    device: torch.device,
    flops: tuple[float, float],
) -> dict[str, Any]:
    """One side's rates over the timed ``chunks``; ``flops``: model FLOPs per real token and per supervised position."""
    samples = sum(len(c) for c in chunks)
    tokens = sum(len(s["input_ids"]) for c in chunks for s in c)
    targets = sum(int((s["labels"] != IGNORE_INDEX).sum()) for c in chunks for s in c)
    peak = peak_tflops("auto", device)
    out = {
        "side": name,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "tflops": (tokens * flops[0] + targets * flops[1]) / seconds / 1e12,
        "seconds": seconds,
        "steps": len(chunks),
    }
    out["mfu"] = out["tflops"] / peak if peak else None
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out


def run(
    size: str,
    stage: str,
    vocab: int,
    batch: int,
    steps: int,
    warmup: int,
    cached_features: bool,
    peer: bool,
    seed: int = 0,
    packing: str = "auto",
    gpus: int = 8,
    save: Callable[[dict[str, Any]], None] = lambda result: None,
) -> dict[str, Any]:
    """One benchmark point: both sides (or alignlm alone), and their ratio. ``save`` gets the result as soon as
    alignlm's side is measured and again at the end: a peer that fails or is killed loses nothing of alignlm's.
    ``gpus``: the GPU count of stage 1's second 558k projection (ideal scaling)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = config(size, stage, vocab, batch, warmup + steps, device, packing)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device == "cpu")
    trainer = Trainer(cfg, stage, acc)
    with torch.device(acc.device):  # random weights made on the device: a 7B model in seconds
        model = trainer.setup_model()
    trainer.total_steps = warmup + steps
    trainer.setup_optimization(model, None)
    samples = make_samples(model, stage, batch * (warmup + steps), seed)
    cache_s = cache_features(model, samples, batch) if cached_features else None
    chunks = grouped(samples, batch, seed)
    # the timed samples' own lengths (both sides isolate each sample in attention, padding is no model FLOP)
    attended = attended_positions(len(s["input_ids"]) for c in chunks[warmup:] for s in c)
    result: dict[str, Any] = {
        "size": size,
        "stage": stage,
        "vocab": vocab,
        "batch": batch,
        "steps": steps,
        "cached_features": cached_features,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "attended_positions": attended,
        # alignlm's side: with cached features the tower never runs; the LM head per supervised position
        "flops_per_token": model_flops_per_token(model, tower_runs=not cached_features, attended=attended, head=False),
        "flops_per_target": head_flops_per_target(model, tower_runs=not cached_features),
    }
    peer_flops = (model_flops_per_token(model, attended=attended, head=False), result["flops_per_target"])
    result["alignlm"] = bench_alignlm(
        stage, chunks, warmup, trainer, (result["flops_per_token"], result["flops_per_target"])
    )
    seconds_per_sample = 1 / result["alignlm"]["samples_per_s"]
    if cache_s is not None:  # one epoch pays each image's build once: per sample, beside its share of the steps
        result["cache_build_s_per_image"] = cache_s
        result["alignlm"]["tokens_per_s_one_epoch"] = result["alignlm"]["tokens_per_s"] / (
            1 + cache_s / seconds_per_sample
        )
        seconds_per_sample += cache_s
    if stage == "pretrain":  # LLaVA-1.5 stage 1: 558k captions, one epoch (its 3.5 h: on 8 A100s)
        result["projected_hours_558k"] = 558_000 * seconds_per_sample / 3600  # this one GPU, the cache's build in
        result["projection_gpus"] = gpus
        result["projected_hours_558k_ideal_on_gpus"] = result["projected_hours_558k"] / gpus  # ideal scaling
    save(result)
    if peer:  # free alignlm's side first: the peer's peak memory is its own
        trainer_stage = trainer.stage
        acc.free_memory()
        del trainer
        model.cpu()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        for s in samples:  # the peer always reads images: it has no feature cache
            if s.get("pixel_values") is None:
                s["pixel_values"] = torch.randn(1, 3, model.image_spec.size, model.image_spec.size)
        try:
            result["peer"] = bench_peer(model, stage, trainer_stage, chunks, warmup, acc.device, peer_flops)
            result["ratio_tokens_per_s"] = result["alignlm"]["tokens_per_s"] / result["peer"]["tokens_per_s"]
            if cache_s is not None:
                epoch_rate = result["alignlm"]["tokens_per_s_one_epoch"]
                result["ratio_tokens_per_s_one_epoch"] = epoch_rate / result["peer"]["tokens_per_s"]
        except (torch.OutOfMemoryError, RuntimeError) as e:  # alignlm fitted this batch; the peer did not
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
                raise
            result["peer_error"] = f"OutOfMemoryError at batch {batch}"
            print(f"peer: {result['peer_error']}", flush=True)
        save(result)
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| size | stage | vocab | batch | side | tokens/s | samples/s | TFLOP/s | MFU | peak GiB | ratio |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        named = r["stage"] + (" (cached features)" if r["cached_features"] else "")
        for key in ("alignlm", "peer"):
            if key not in r:
                continue
            s = r[key]
            mfu = f"{100 * s['mfu']:.1f} %" if s["mfu"] is not None else "-"
            mem = f"{s['peak_memory_gib']:.1f}" if s["peak_memory_gib"] is not None else "-"
            ratio = f"{r['ratio_tokens_per_s']:.2f}x" if key == "alignlm" and "ratio_tokens_per_s" in r else ""
            stage = named + (" (packed)" if key == "alignlm" and s.get("packed") else "")
            lines.append(
                f"| {r['size']} | {stage} | {r['vocab']} | {r['batch']} | {s['side']} | {s['tokens_per_s']:,.0f} | "
                f"{s['samples_per_s']:.2f} | {s['tflops']:.1f} | {mfu} | {mem} | {ratio} |"
            )
        if "peer_error" in r:
            lines.append(f"| {r['size']} | {named} | {r['vocab']} | {r['batch']} | peer | {r['peer_error']} |||||")
    lines += [one_epoch(r) for r in results if "cache_build_s_per_image" in r]
    lines += [projection(r) for r in results if "projected_hours_558k" in r]
    return "\n".join(lines)


def one_epoch(result: dict[str, Any]) -> str:
    """A cached point in words: the cache's build per image, and alignlm's one-epoch tokens/s and ratio with it."""
    ratio = result.get("ratio_tokens_per_s_one_epoch")
    return (
        f"cached features, one epoch: the cache's build {1000 * result['cache_build_s_per_image']:.2f} ms/image; "
        f"alignlm {result['alignlm']['tokens_per_s_one_epoch']:,.0f} tokens/s with it"
        + (f", {ratio:.2f}x the peer" if ratio is not None else "")
    )


def projection(result: dict[str, Any]) -> str:
    """Stage 1's 558k projection in words: one GPU's hours first, then the ideal-scaling figure, said to be one."""
    return (
        f"558k captions, one epoch, at alignlm's {result['alignlm']['samples_per_s']:.1f} samples/s"
        + (" and the cache's build" if "cache_build_s_per_image" in result else "")
        + ": "
        f"{result['projected_hours_558k']:.2f} h on one {result['device']} (this run's); "
        f"{result['projected_hours_558k_ideal_on_gpus']:.2f} h on {result['projection_gpus']} of them at ideal scaling "
        "(no communication cost; LLaVA-1.5's 3.5 h: on 8 A100s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--stage", choices=sorted(PARTS), default="finetune")
    ap.add_argument("--vocab", type=int, default=32000, help="embedding and LM-head rows")
    ap.add_argument("--batch", type=int, default=16, help="samples per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--cached-features", action="store_true", help="alignlm reads the frozen tower's cached features")
    ap.add_argument("--no-peer", action="store_true", help="alignlm alone (the peer does not fit, e.g. 7B)")
    ap.add_argument("--packing", choices=("auto", "true", "false"), default="auto", help="alignlm's stage.data.packing")
    ap.add_argument("--gpus", type=int, default=8, help="stage 1's 558k projection also for this many GPUs (ideal)")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args()
    if args.gpus < 1:
        ap.error(f"--gpus {args.gpus}: the 558k projection's GPU count must be at least 1")

    def save(result: dict[str, Any]) -> None:
        if args.json:  # whole or not at all, also when a time limit kills the process mid-write
            tmp = Path(f"{args.json}.tmp")
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(args.json)

    result = run(
        args.size,
        args.stage,
        args.vocab,
        args.batch,
        args.steps,
        args.warmup,
        args.cached_features,
        not args.no_peer,
        packing=args.packing,
        gpus=args.gpus,
        save=save,
    )
    print(table([result]))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
