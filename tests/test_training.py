"""Training: stages chain, loss goes down, resume and accumulation reproduce an uninterrupted run, final/ reloads."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignlm.data.records import DataError
from alignlm.pipeline import run
from alignlm.training.determinism import deterministic, strict
from alignlm.training.trainer import StopTraining
from tests.conftest import (
    RANKS,
    WAIT_FREE_RECIPES,
    compose,
    free_port,
    read_losses,
    tiny_overrides,
    waits_in_training_steps,
    write_colour_set,
)

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_trains_both_stages_and_evaluates(colour_set, tmp_path):
    cfg = compose(
        *tiny_overrides(
            colour_set,
            tmp_path,
            "stages.pretrain.max_steps=30",
            "stages.pretrain.lr.connector=5e-3",
            f"eval.sets=[{{name:colours,path:{colour_set['test']}}}]",
        )
    )
    summary = run(cfg)
    pre = read_losses(tmp_path / "t" / "pretrain")
    assert len(pre) == 30 and sum(pre[-5:]) / 5 < sum(pre[:5]) / 5  # loss goes down
    assert summary["stages"]["finetune"]["steps"] == 4
    assert summary["eval"]["colours"]["n"] == 12 and summary["eval"]["colours"]["chance"] == pytest.approx(1 / 3)
    for stage, parts in (("pretrain", ["connector"]), ("finetune", ["connector", "llm"])):
        final = tmp_path / "t" / stage / "final"
        assert (final / "config.yaml").exists()
        from alignlm.models.io import final_parts

        assert final_parts(final) == parts
    stages = json.loads((tmp_path / "t" / "summary.json").read_text())["stages"]
    assert stages["pretrain"]["world_size"] == 1
    # steady-state throughput in real tokens, with the model FLOP/s it means (no MFU or GPU memory on a CPU)
    assert stages["pretrain"]["tokens_per_s"] > 0 and stages["pretrain"]["tflops"] > 0
    if torch.cuda.is_available():
        assert stages["pretrain"]["peak_memory_gib"] > 0
    else:
        assert stages["pretrain"]["mfu"] is None and stages["pretrain"]["peak_memory_gib"] is None
    rows = [json.loads(r) for r in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31)) and all("tokens_per_s" in r and "tflops" in r for r in rows)
    # a logged rate covers the time its steps took, not the instant their values reached the host (every 10 steps):
    # no row may claim more samples per second than the stage's samples over its whole wall time allow by far (the
    # wall time also holds start-up and 14 checkpoints, a large share next to a GPU's millisecond steps; a rate taken
    # at the fetch would be orders of magnitude off)
    overall = 30 * 4 / stages["pretrain"]["seconds"]
    assert max(r["samples_per_s"] for r in rows) < 20 * overall
    # finished stages are skipped on a rerun of the same settings (resume=auto), and their figures are kept, with or
    # without eval sets (evaluation is no stage's setting)
    again = run(
        compose(
            *tiny_overrides(
                colour_set,
                tmp_path,
                "stages.pretrain.max_steps=30",
                "stages.pretrain.lr.connector=5e-3",
                "eval.sets=[]",
            )
        )
    )
    assert again["stages"] == summary["stages"] and again["eval"] == {}
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["stages"] == summary["stages"]


def test_final_reloads_without_training_code(colour_set, tmp_path):
    from alignlm.models.io import load_model
    from tests.conftest import make_batch

    run(compose(*tiny_overrides(colour_set, tmp_path, "run=[pretrain]")))
    final = tmp_path / "t" / "pretrain" / "final"
    a, b = load_model(final), load_model(final)
    batch = make_batch(a, [1, 0])
    torch.testing.assert_close(a(batch, return_logits=True).logits, b(batch, return_logits=True).logits)
    fresh = compose().model
    from alignlm.models.build import build_model

    untrained = build_model(fresh)
    assert not torch.equal(untrained.connector.proj[0].weight, a.connector.proj[0].weight)


def test_resume_after_stop_matches_uninterrupted(colour_set, tmp_path):
    base = tiny_overrides(colour_set, tmp_path, "run=[pretrain]", "stages.pretrain.max_steps=7")
    run(compose(*base, "run_name=full"))
    with pytest.raises(StopTraining, match="after step 3"):
        run(compose(*base, "run_name=resumed", "stop_after_steps=3"))
    assert not (tmp_path / "resumed" / "pretrain" / "final").exists()
    run(compose(*base, "run_name=resumed"))
    full, resumed = read_losses(tmp_path / "full" / "pretrain"), read_losses(tmp_path / "resumed" / "pretrain")
    assert len(resumed) == 7
    assert resumed == pytest.approx(full, rel=1e-6, abs=1e-7)


def test_a_resumed_stages_peak_memory_is_the_highest_of_its_segments(colour_set, tmp_path, monkeypatch):
    """summary.json's peak memory of a stopped and resumed stage is its segments' highest (a checkpoint carries it):
    it had been the last segment's alone, whose device memory counts afresh."""
    from alignlm.training import trainer

    base = tiny_overrides(colour_set, tmp_path, "run=[pretrain]", "stages.pretrain.max_steps=5", "eval.sets=[]")
    monkeypatch.setattr(trainer, "peak_memory_gib", lambda device: 5.0)
    with pytest.raises(StopTraining, match="after step 3"):
        run(compose(*base, "stop_after_steps=3"))
    monkeypatch.setattr(trainer, "peak_memory_gib", lambda device: 3.0)
    assert run(compose(*base))["stages"]["pretrain"]["peak_memory_gib"] == 5.0
    rows = [json.loads(line) for line in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["memory/peak_gib"] for r in rows if "memory/peak_gib" in r][-1] == 5.0  # the resumed segment's rows


def test_resume_after_sigkill_matches_uninterrupted(colour_set, tmp_path):
    """A hard kill mid-epoch: rerunning the same command resumes from the newest checkpoint and reproduces every step."""
    steps = 40
    base = tiny_overrides(
        colour_set, tmp_path, "run=[pretrain]", f"stages.pretrain.max_steps={steps}", "stages.pretrain.save_every=3"
    )
    run(compose(*base, "run_name=full"))
    cmd = [sys.executable, str(ROOT / "train.py"), *base, "run_name=killed"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = tmp_path / "killed" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 8):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert metrics.exists() and len(metrics.read_text().splitlines()) >= 8, "the run never reached step 8"
    assert not (tmp_path / "killed" / "pretrain" / "final").exists(), "the run finished before it could be killed"
    run(compose(*base, "run_name=killed"))
    assert read_losses(tmp_path / "killed" / "pretrain") == pytest.approx(
        read_losses(tmp_path / "full" / "pretrain"), rel=1e-6, abs=1e-7
    )


@pytest.mark.parametrize("packing", ["false", "true"])
def test_gradient_accumulation_matches_one_big_batch(colour_set, tmp_path, packing):
    """Token-normalised LM loss: 2 micro-batches of 4 == 1 batch of 8, though samples differ in length; padded or
    packed rows alike."""
    base = tiny_overrides(  # exactness is checked in fp32 (on a GPU, auto would pick bf16)
        colour_set,
        tmp_path,
        "run=[finetune]",
        "stages.finetune.init_from=null",
        "stages.finetune.max_steps=3",
        "mixed_precision=no",
        f"stages.finetune.data.packing={packing}",
    )
    run(compose(*base, "run_name=big", "stages.finetune.per_device_batch_size=8"))
    run(compose(*base, "run_name=accum", "stages.finetune.per_device_batch_size=4", "stages.finetune.grad_accum=2"))
    assert read_losses(tmp_path / "accum" / "finetune") == pytest.approx(
        read_losses(tmp_path / "big" / "finetune"), rel=1e-5
    )


def test_the_gpu_defaults_train_on_the_cpu_too(colour_set, tmp_path):
    """What a GPU run does by default, here on the CPU: bf16 autocast with the frozen parts stored in bf16, the fused
    AdamW and the alignment monitor; plain data parallelism (accelerate converts the forward's output to fp32)."""
    out = run(
        compose(
            *tiny_overrides(colour_set, tmp_path),
            "mixed_precision=bf16",
            "stages.pretrain.fused_optimizer=true",
            "stages.finetune.fused_optimizer=true",
            "monitor.every=2",
            f"monitor.probe={colour_set['pretrain']}",
            "monitor.n=8",
            "monitor.topk=4",
        )
    )
    for stage in ("pretrain", "finetune"):
        rows = [json.loads(r) for r in (tmp_path / "t" / stage / "metrics.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
        assert "monitor/pooled/cka" in rows[0] and "monitor/pooled/cka" in rows[1]  # after step 1, then every 2
    assert (tmp_path / "t" / "finetune" / "final" / "model.safetensors").exists() and out["stages"]["finetune"]


@pytest.mark.parametrize("stage, extra", WAIT_FREE_RECIPES.values(), ids=WAIT_FREE_RECIPES.keys())
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_training_step_reads_nothing_back_from_the_device(colour_set, tmp_path, stage, extra, precision):
    """tests/test_gpu.py's check, as far as a CPU can tell: over whole training steps (padded or packed rows, fused
    AdamW, and the recipes' extra parts: the contrastive objective, the MoE connector with an expert cap, V2L, AlignGPT's
    level slot, VLAP's Sinkhorn) no op runs that would make the host wait for the GPU, in fp32 and in a GPU's default
    bf16, and none that lacks a deterministic CUDA kernel (it would stop a ``deterministic: true`` run)."""
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path),
        f"run=[{stage}]",
        f"stages.{stage}.init_from=null",
        f"stages.{stage}.fused_optimizer=true",
        f"mixed_precision={precision}",
        *extra,
    )
    ops, rows = waits_in_training_steps(cfg, stage)
    assert ops.seen == []
    assert len(rows) == 2 and all(math.isfinite(r[1]["loss/total"]) for r in rows)


def test_deterministic_kernels_hold_for_the_run_only_and_change_no_number_on_the_cpu(colour_set, tmp_path, monkeypatch):
    """``deterministic: true`` switches PyTorch to its deterministic kernels while the run trains (the GPU's
    bitwise reproducibility) and restores the previous settings afterwards; on a CPU the numbers stay the same."""
    from alignlm.training.trainer import Trainer

    seen = []
    fit = Trainer.fit

    def watched(self):
        seen.append((strict(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", watched)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    losses = {}
    for flag in ("false", "true"):
        run(
            compose(
                *tiny_overrides(colour_set, tmp_path, "run=[pretrain]", f"run_name=d{flag}", f"deterministic={flag}")
            )
        )
        losses[flag] = read_losses(tmp_path / f"d{flag}" / "pretrain")
    assert seen == [(False, None), (True, ":4096:8")]  # strict: warn-only would leave SDPA's backward non-deterministic
    assert torch.are_deterministic_algorithms_enabled() == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    exact = not torch.cuda.is_available()  # a GPU's deterministic kernels are other kernels: equal up to float order
    assert losses["true"] == (losses["false"] if exact else pytest.approx(losses["false"], rel=1e-5))
    assert len(losses["true"]) == 6


def test_a_checkpoint_due_at_the_stop_step_is_written_once(colour_set, tmp_path, monkeypatch):
    """stop_after_steps at a save_every step: one write (a 7B checkpoint with its optimizer state is ~100 GB)."""
    from alignlm.training.trainer import Trainer

    written = []
    save = Trainer.save_checkpoint
    monkeypatch.setattr(
        Trainer, "save_checkpoint", lambda self, step, **kw: written.append(step) or save(self, step, **kw)
    )
    base = tiny_overrides(colour_set, tmp_path, "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=6")
    with pytest.raises(StopTraining, match="after step 4"):
        run(compose(*base, "stop_after_steps=4"))
    assert written == [2, 4]


def test_stop_after_steps_counts_the_steps_of_the_whole_process_over_its_stages(colour_set, tmp_path):
    """``stop_after_steps`` ends the process after N steps: it counted per stage, so a process that finished one stage
    trained up to N more of the next, and a job sized to N steps ran past its time limit."""
    base = tiny_overrides(colour_set, tmp_path, "eval.sets=[]")  # pretrain 6 steps, finetune 4
    with pytest.raises(StopTraining, match=r"stopped before stage finetune \(stop_after_steps=6 steps"):
        run(compose(*base, "stop_after_steps=6"))  # pretrain used them all: finetune is the rerun's
    assert (tmp_path / "t" / "pretrain" / "final").exists() and not (tmp_path / "t" / "finetune").exists()
    with pytest.raises(StopTraining, match="after step 3 of 4"):  # of finetune's, counted in this process alone
        run(compose(*base, "stop_after_steps=3"))
    assert len(read_losses(tmp_path / "t" / "finetune")) == 3


def test_a_deterministic_run_evaluates_with_top_p_sampling(colour_set, tmp_path):
    """Top-p takes a float cumulative sum, which has no deterministic CUDA kernel: after a ``deterministic: true``
    stage the evaluation warns there instead of stopping (conftest raises as a GPU would in strict mode)."""
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path, "run=[finetune]", "stages.finetune.init_from=null"),
        f"eval.sets=[{{name:colours,path:{colour_set['test']}}}]",
        "eval.limit=4",
        "eval.generation.do_sample=true",
        "+eval.generation.top_p=0.9",
    )
    assert run(cfg)["eval"]["colours"]["n"] == 4
    assert not torch.are_deterministic_algorithms_enabled()


def test_model_flops_follow_the_standard_formula_counted_by_hand(tiny_model):
    """6 N + 12 L d s, each part charged for the passes it takes, counted by hand from the tiny config (Llama: width 64,
    2 layers, 4 heads of 16, 2 KV heads, MLP 128, 513 rows; CLIP: width 32, 2 layers, MLP 64, 8x8 patches, 17
    positions; MLP connector 32 -> 64 -> 64). The input embedding and the tower's position table are lookups, no
    matmul; causal attention is charged for the positions each token sees; a tower fed from the cache is not counted."""
    from alignlm.data.collate import attended_pairs
    from alignlm.training.throughput import (
        attended_positions,
        attention_flops_per_pair,
        head_flops_per_target,
        model_flops_per_token,
    )

    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k, v, o, gate/up/down, two norms
    llm = 2 * layer + 64 + 513 * 64  # the final norm and the (untied) LM head; not the 513 x 64 embedding
    clip_layer = 4 * (32 * 32 + 32) + 2 * 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32)  # q, k, v, out, two norms, MLP
    tower = 32 + 3 * 8 * 8 * 32 + 2 * 32 + 2 * clip_layer + 2 * 32  # class token, patch conv, pre/post norms
    connector = (32 * 64 + 64) + (64 * 64 + 64)
    attention = 2 * 2 * 2 * (4 * 16)  # forward, per attended position: QK^T and AV in 2 layers of 4 x 16
    seen = attended_positions([3, 5])  # samples of 3 and 5 tokens: (1 + 2 + 3) + (1 + ... + 5) positions, 8 tokens
    assert seen == 21 / 8 and attended_pairs([3, 5]) == 21  # the collator counts a batch's pairs

    model = tiny_model()
    model.requires_grad_(False)
    model.connector.requires_grad_(True)  # LLaVA's stage 1: gradients flow back through the frozen LLM, not the tower
    expected = 2 * tower + 6 * connector + 4 * llm + 3 * attention * seen
    assert model_flops_per_token(model, attended=seen) == pytest.approx(expected, rel=1e-12)
    assert model_flops_per_token(model, tower_runs=False, attended=seen) == pytest.approx(
        expected - 2 * tower, rel=1e-12
    )
    assert model_flops_per_token(model) == 2 * tower + 6 * connector + 4 * llm  # attention left out
    assert attention_flops_per_pair(model) == pytest.approx(3 * attention)  # a step's: tokens x that + pairs x this
    head = 513 * 64  # charged by the trainer per supervised position, where alone alignlm computes logits
    assert head_flops_per_target(model) == 4 * head
    assert model_flops_per_token(model, head=False) == 2 * tower + 6 * connector + 4 * (llm - head)
    model.llm.requires_grad_(True)  # the finetune: the embedding trains too and is still no matmul
    expected = 2 * tower + 6 * connector + 6 * llm + 3 * attention * seen
    assert model_flops_per_token(model, attended=seen) == pytest.approx(expected, rel=1e-12)
    assert head_flops_per_target(model) == 6 * head
    model.llm.lm_head.weight = model.llm.get_input_embeddings().weight  # a tied head is still a matmul
    assert model_flops_per_token(model, attended=seen) == pytest.approx(expected, rel=1e-12)
    assert head_flops_per_target(model) == 6 * head  # the head's, not the embedding table it shares
    model.requires_grad_(False)
    model.vision.requires_grad_(True)  # the tower alone trains: gradients flow back through the connector and LLM
    expected = 6 * tower + 4 * connector + 4 * llm + 3 * attention * seen
    assert model_flops_per_token(model, attended=seen) == pytest.approx(expected, rel=1e-12)
    model.requires_grad_(False)  # nothing trains: one forward pass
    expected = 2 * (tower + connector + llm) + attention * seen
    assert model_flops_per_token(model, attended=seen) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "name,peak",
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
     ("NVIDIA GH200 480GB", 989.0), ("Tesla T4", None)],
)  # fmt: skip
def test_mfu_divides_by_the_peak_of_the_card_by_its_name(monkeypatch, name, peak):
    from alignlm.training.throughput import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops("auto", torch.device("cuda", 0)) == peak  # an H100 PCIe once got the SXM card's 989
    assert peak_tflops("auto", torch.device("cpu")) is None and peak_tflops(500, torch.device("cpu")) == 500.0


def _unpool():
    return F.max_unpool2d(*F.max_pool2d(torch.randn(1, 1, 4, 4), 2, return_indices=True), 2)


def _backward(op, *args, **kwargs):
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    return lambda: op(x, *args, **kwargs).sum().backward()


_bag = torch.tensor([[1, 2], [3, 4]])
STRICT_CASES = {  # name: (op, refused on CUDA in strict mode)
    "kthvalue": (lambda: torch.randn(9).kthvalue(3), True),
    "median(dim)": (lambda: torch.randn(3, 4).median(1), True),
    "median()": (lambda: torch.randn(3, 4).median(), False),
    "float cumsum": (lambda: torch.randn(5).cumsum(0), True),
    "long cumsum to float": (lambda: torch.arange(5).cumsum(0, dtype=torch.float32), True),
    "long cumsum": (lambda: torch.arange(5).cumsum(0), False),
    "weighted bincount": (lambda: torch.arange(2).bincount(torch.ones(2)), True),
    "scatter_reduce prod": (lambda: torch.ones(3).scatter_reduce(0, torch.arange(2), torch.ones(2), "prod"), True),
    "in-place scatter_reduce prod": (
        lambda: torch.ones(3).scatter_reduce_(0, torch.arange(2), torch.ones(2), "prod"),
        True,
    ),
    "scatter_reduce sum": (lambda: torch.ones(3).scatter_reduce(0, torch.arange(2), torch.ones(2), "sum"), False),
    "histc": (lambda: torch.randn(9).histc(), True),
    "max_unpool": (_unpool, True),
    "2d nll_loss": (lambda: F.nll_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)), True),
    "adaptive_avg_pool2d backward": (_backward(F.adaptive_avg_pool2d, 2), True),
    "max_pool2d backward": (_backward(F.max_pool2d, 2), False),
    "bilinear backward": (_backward(F.interpolate, scale_factor=2, mode="bilinear"), True),
    "nearest backward": (_backward(F.interpolate, scale_factor=2, mode="nearest"), False),
    "reflection pad backward": (_backward(F.pad, (1, 1, 1, 1), mode="reflect"), True),
    "replication pad backward": (_backward(F.pad, (1, 1, 1, 1), mode="replicate"), False),
    "max embedding_bag backward": (
        lambda: F.embedding_bag(_bag, torch.randn(5, 2, requires_grad=True), mode="max").sum().backward(),
        True,
    ),
    "mean embedding_bag backward": (
        lambda: F.embedding_bag(_bag, torch.randn(5, 2, requires_grad=True)).sum().backward(),
        False,
    ),
    "index_add": (lambda: torch.zeros(3).index_add(0, torch.zeros(2, dtype=torch.long), torch.ones(2)), False),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine PyTorch refuses the CUDA ops itself")
@pytest.mark.parametrize("name", STRICT_CASES)
def test_the_cpu_suite_refuses_what_strict_mode_refuses_on_cuda(name):
    """conftest's stand-in for CUDA's strict deterministic mode follows PyTorch's list, arguments included: a run of
    the suite with ``deterministic=true`` fails on the CPU where it would stop on a GPU."""
    op, refused = STRICT_CASES[name]
    with deterministic(True):
        if refused:
            with pytest.raises(RuntimeError, match="no deterministic CUDA kernel"):
                op()
        else:
            op()


def test_lora_stage_saves_merged_weights(colour_set, tmp_path):
    from alignlm.models.io import load_model

    run(compose(*tiny_overrides(colour_set, tmp_path, "stages.finetune.parts.llm=lora", "stages.finetune.lr.llm=1e-2")))
    final = tmp_path / "t" / "finetune" / "final"
    model = load_model(final)  # plain weights: no peft wrapper needed to reload
    assert not any("lora" in n for n in model.state_dict())
    pre = load_model(tmp_path / "t" / "pretrain" / "final")
    w = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(
        dict(model.llm.model.named_parameters())[w[len("") :]], dict(pre.llm.model.named_parameters())[w]
    )


def test_a_bf16_lora_stage_stores_its_frozen_base_in_bf16_and_merges_in_fp32(colour_set, tmp_path, monkeypatch):
    """Under bf16 the LoRA-adapted LLM's frozen linear layers are stored in bf16 (autocast casts them at every use
    anyway), LoRA's weights, the embeddings and the norms stay fp32; ``final/`` merges LoRA in fp32 (a delta added to
    a bf16 weight rounds away): plain fp32 weights, finite, that load; a stopped and resumed run trains the same."""
    from safetensors.torch import load_file

    from alignlm.models.io import load_model
    from alignlm.training.trainer import Trainer

    seen: dict[str, tuple[torch.dtype, bool]] = {}
    q: dict[str, torch.Tensor] = {}
    save_final = Trainer.save_final

    def watched(self: Trainer):
        llm = self.core().llm
        seen.update({n: (p.dtype, p.requires_grad) for n, p in llm.named_parameters()})
        layer = llm.base_model.model.model.layers[0].self_attn.q_proj
        q["base"] = layer.base_layer.weight.detach().float().clone()
        q["delta"] = layer.get_delta_weight("default").detach().clone()
        return save_final(self)

    monkeypatch.setattr(Trainer, "save_final", watched)
    base = tiny_overrides(
        colour_set,
        tmp_path,
        "run=[finetune]",
        "stages.finetune.init_from=null",
        "mixed_precision=bf16",
        "stages.finetune.parts.llm=lora",
        "stages.finetune.lr.llm=1e-2",
    )
    run(compose(*base))
    frozen = {n: d for n, (d, trains) in seen.items() if not trains}
    assert {d for n, d in frozen.items() if n.endswith("base_layer.weight")} == {torch.bfloat16}
    assert frozen["base_model.model.lm_head.weight"] == torch.bfloat16  # the head (untied here): a matmul only
    assert frozen["base_model.model.model.embed_tokens.weight"] == torch.float32  # a lookup: autocast casts nothing
    assert all(d == torch.float32 for n, d in frozen.items() if "norm" in n)
    assert {d for d, trains in seen.values() if trains} == {torch.float32}  # LoRA's A and B
    final = tmp_path / "t" / "finetune" / "final"
    weights = load_file(final / "model.safetensors")
    assert not any("lora" in k for k in weights)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in weights.values())
    assert q["delta"].abs().max() > 0
    torch.testing.assert_close(
        weights["llm.model.layers.0.self_attn.q_proj.weight"], q["base"] + q["delta"], rtol=0, atol=1e-7
    )
    load_model(final)
    with pytest.raises(StopTraining):
        run(compose(*base, "run_name=resumed", "stop_after_steps=2"))
    run(compose(*base, "run_name=resumed"))
    assert read_losses(tmp_path / "resumed" / "finetune") == pytest.approx(read_losses(tmp_path / "t" / "finetune"))


def test_lora_merges_into_the_unrounded_weights_an_earlier_stage_trained(colour_set, tmp_path, alignlm_log):
    """A LoRA stage under bf16 after a full finetune (a DPO stage's place) stores the finetuned LLM's frozen linear
    layers in bf16 and had merged its adapters into that rounding: its final/ undid 8 % of the finetune's change to
    the LLM. With a learning rate too small to move the adapters, the LoRA stage's final/ holds the finetune's LLM
    exactly; a starting weight written again since the stage began is left rounded, with a warning."""
    from safetensors.torch import load_file, save_file

    from alignlm.training import checkpoint as ckpt

    overrides = tiny_overrides(
        colour_set,
        tmp_path,
        "mixed_precision=bf16",
        "run=[finetune,lora]",
        "stages.finetune.init_from=null",
        "stages.finetune.lr.llm=1e-4",
        "+stage@stages.lora=finetune",
        "stages.lora.init_from=finetune",
        "stages.lora.parts={vision:frozen,connector:frozen,llm:lora}",
        "stages.lora.lr.llm=1e-30",
        "stages.lora.max_steps=2",
        "stages.lora.per_device_batch_size=4",
        f"stages.lora.data.sources=[{{path:{colour_set['instruct']}}}]",
    )
    run(compose(*overrides))
    finetuned = load_file(tmp_path / "t" / "finetune" / "final" / "model.safetensors")
    merged = load_file(tmp_path / "t" / "lora" / "final" / "model.safetensors")
    q = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(finetuned[q], finetuned[q].bfloat16().float())  # the finetune's weights are not bf16's
    assert all(torch.equal(merged[k], v) for k, v in finetuned.items() if k.startswith("llm."))

    model = torch.nn.ModuleDict({"llm": torch.nn.Linear(4, 4, bias=False)}).bfloat16()
    start = tmp_path / "start"
    start.mkdir()
    save_file({"llm.weight": model.llm.weight.detach().float() + 1.0}, start / "model.safetensors")
    assert ckpt.rounded_at_start(model, start) == {"llm.weight": torch.bfloat16}
    ckpt.restore_unrounded(model, start, {"llm.weight": torch.bfloat16})
    assert model.llm.weight.dtype == torch.bfloat16
    assert "changed since this stage started: 1 weights (llm.weight)" in alignlm_log.text
    save_file({"other.weight": torch.zeros(4, 4)}, start / "model.safetensors")  # written again without it: no crash
    ckpt.restore_unrounded(model, start, {"llm.weight": torch.bfloat16})
    (start / "model.safetensors").unlink()
    ckpt.restore_unrounded(model, start, {"llm.weight": torch.bfloat16})
    assert alignlm_log.text.count("changed since this stage started: 1 weights (llm.weight)") == 3


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_what_trains_is_held_in_fp32_and_saved_so_whatever_its_part_was_loaded_in(
    colour_set, tmp_path, monkeypatch, mode
):
    """An LLM loaded in bf16 (``model.llm.dtype: bfloat16``, as the vicuna_7b, llama3_8b and qwen2_5_0_5b presets load
    it) trained in bf16 with no fp32 master weights: AdamW's steps of 2e-5 rounded away (3 steps moved 30 % of its
    entries), and LoRA's delta merged into the bf16 base lost 12 % of itself. Now what trains is fp32 (frozen weights
    keep their storage), ``final/`` holds the trained part in fp32, LoRA merged in fp32, and a later stage that trains
    the part fully starts from those fp32 weights unrounded."""
    from safetensors.torch import load_file

    from alignlm.models.build import build_model
    from alignlm.pipeline import make_accelerator
    from alignlm.training import trainer as trainer_module
    from alignlm.training.trainer import Trainer

    def bf16_llm(cfg):  # what model.llm.dtype=bfloat16 loads (the tiny LLM is built, not loaded)
        model = build_model(cfg)
        model.llm.to(torch.bfloat16)
        return model

    monkeypatch.setattr(trainer_module, "build_model", bf16_llm)
    seen: dict[str, torch.Tensor | torch.dtype] = {}
    setup_model = Trainer.setup_model

    def watched(self: Trainer):
        model = setup_model(self)
        seen.update({f"start.{k}": v.detach().float().clone() for k, v in model.llm.state_dict().items()})
        seen["trained"] = {p.dtype for p in model.llm.parameters() if p.requires_grad}
        seen["frozen"] = {p.dtype for p in model.llm.parameters() if not p.requires_grad}
        return model

    monkeypatch.setattr(Trainer, "setup_model", watched)
    save_final = Trainer.save_final

    def merged(self: Trainer):
        if mode == "lora":
            layer = self.core().llm.base_model.model.model.layers[0].self_attn.q_proj
            seen["base"] = layer.base_layer.weight.detach().float().clone()
            seen["delta"] = layer.get_delta_weight("default").detach().float().clone()
        return save_final(self)

    monkeypatch.setattr(Trainer, "save_final", merged)
    lr = "2e-5" if mode == "full" else "2e-4"
    overrides = tiny_overrides(
        colour_set,
        tmp_path,
        "run=[finetune]",
        "mixed_precision=bf16",
        "stages.finetune.init_from=null",
        f"stages.finetune.parts.llm={mode}",
        f"stages.finetune.lr.llm={lr}",
        "stages.finetune.max_steps=3",
        "stages.finetune.save_every=0",
    )
    run(compose(*overrides))
    assert seen["trained"] == {torch.float32}
    weights = load_file(tmp_path / "t" / "finetune" / "final" / "model.safetensors")
    llm = {k.removeprefix("llm."): v for k, v in weights.items() if k.startswith("llm.")}
    assert {v.dtype for v in llm.values()} == {torch.float32}
    if mode == "lora":
        assert seen["frozen"] == {torch.bfloat16}  # the base, embeddings and norms keep their storage
        assert seen["delta"].abs().max() > 0  # merged into the bf16 base: 12 % of it lost
        torch.testing.assert_close(
            llm["model.layers.0.self_attn.q_proj.weight"], seen["base"] + seen["delta"], rtol=0, atol=1e-7
        )
        return
    matrices = [k for k, v in llm.items() if v.ndim == 2 and "embed" not in k]
    changed = sum(int((llm[k] != seen[f"start.{k}"]).sum()) for k in matrices)
    assert changed > 0.99 * sum(llm[k].numel() for k in matrices)  # bf16 weights: 30 %
    later = compose(*overrides, f"stages.finetune.init_from={tmp_path / 't' / 'finetune' / 'final'}", "run_name=u")
    model = Trainer(later, "finetune", make_accelerator(later)).setup_model()
    assert all(torch.equal(p, llm[k]) for k, p in model.llm.state_dict().items())  # not rounded to bf16 on the way


def test_the_feature_cache_keeps_each_autocasts_features_apart(colour_set, tmp_path, tiny_model):
    """The cache's key left out the autocast the features were computed under: a tower that ``final/`` saves stays
    fp32 under bf16, so a bf16 run and an fp32 run shared one folder and the fp32 run read bf16-computed features. Now
    each precision has its own, and an fp32 run's key is the one it always had (fp32 caches stay valid)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from alignlm.data.images import load_rgb, preprocess
    from alignlm.data.llava import LlavaDataset
    from alignlm.data.records import Source
    from alignlm.data.templates import get_template
    from alignlm.training.feature_cache import attach_feature_cache, tower_fingerprint

    model = tiny_model()
    model.frozen_parts.add("vision")
    vision_cfg = compose().model.vision
    features = {}
    for precision in ("bf16", "no"):  # the bf16 run fills the cache first
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        acc = Accelerator(cpu=True, mixed_precision=precision)
        args = (model.tokenizer, get_template("plain"), model.image_spec, model.num_image_tokens)
        dataset = LlavaDataset([Source(str(colour_set["pretrain"]))], *args)
        attach_feature_cache(model, dataset, True, tmp_path / "cache", vision_cfg, acc)
        features[precision] = dataset[0]["image_embeds"][0]
    pixels = preprocess(load_rgb(colour_set["pretrain"].parent / "images" / "0.png"), model.image_spec, "pad")
    with torch.no_grad():
        live = model.vision.eval()(pixels[None])[0]
    torch.testing.assert_close(features["no"], live)
    assert not torch.allclose(features["bf16"].float(), live, atol=1e-4)  # bf16 arithmetic: other numbers
    folders = {p.name for p in (tmp_path / "cache").iterdir()}
    assert len(folders) == 2 and tower_fingerprint(model, vision_cfg) in folders


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (["model/vision=nonexistent"], Exception, "(?s)nonexistent.*clip_vit_l14_336.*efficientnet_lite0"),
        (["run=[pretrain,polish]"], ValueError, "polish"),
        (["stages.pretrain.parts.llm=half"], ValueError, "frozen.*full.*lora"),
        (["stages.pretrain.data.on_error=ignore"], ValueError, "skip.*raise"),
        (["stages.pretrain.data.template=alpaca"], ValueError, "chat.*plain.*vicuna_v1"),
        (["resume=sometimes"], ValueError, "auto.*never"),
        (["~stages.pretrain.lr.connector"], ValueError, r"stages\.pretrain\.lr\.connector is missing"),
        (["mixed_precision=fp8"], ValueError, "auto.*bf16"),
        (["deterministic=sometimes"], ValueError, "deterministic.*true or false"),
        (["model.llm._target_=alignlm.models.llm.nope"], ValueError, "model.llm"),
    ],
)
def test_config_errors_are_clear(colour_set, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        run(compose(*tiny_overrides(colour_set, tmp_path, "run=[pretrain]", *overrides)))


def test_missing_data_file_names_it(tmp_path):
    with pytest.raises(DataError, match="data file nowhere.json does not exist"):  # exit status 65, no traceback
        run(compose(f"output_dir={tmp_path}", "run=[pretrain]", "stages.pretrain.data.sources=[{path:nowhere.json}]"))


def test_wandb_offline_needs_no_network_and_a_resumed_stage_continues_its_run(colour_set, tmp_path):
    """Offline wandb needs no network; a stage stopped and resumed logs into one wandb run (one id), where each
    segment had started a run of its own."""
    args = tiny_overrides(
        colour_set,
        tmp_path,
        "run=[pretrain]",
        "stages.pretrain.max_steps=4",
        "stages.pretrain.save_every=2",
        "logging.wandb.mode=offline",
    )
    with pytest.raises(StopTraining):
        run(compose(*args, "stop_after_steps=2"))
    run(compose(*args))
    runs = sorted((tmp_path / "t" / "pretrain" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1


def test_wandb_mode_from_the_environment_wins_and_online_without_a_key_is_one_line(tmp_path, monkeypatch):
    """A cluster's compute nodes set WANDB_MODE=offline: the config's mode had been passed over it, so online ended the
    run with a traceback ("No API key configured"), and WANDB_MODE=disabled still wrote a wandb folder."""
    pytest.importorskip("wandb")
    from alignlm.config import ConfigError
    from alignlm.training.logging import MetricsLogger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path / "a" / "metrics.jsonl", {"mode": "online"}, "r", {}, enabled=True)
    logger.log({"loss/total": 1.0}, step=1)
    logger.close()
    assert list((tmp_path / "a" / "wandb").glob("offline-run-*"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    MetricsLogger(tmp_path / "b" / "metrics.jsonl", {"mode": "offline"}, "r", {}, enabled=True).close()
    assert not (tmp_path / "b" / "wandb").exists() and not (tmp_path / "b" / "wandb_id").exists()
    monkeypatch.setenv("WANDB_MODE", "online")  # exported for other work: turns on nothing the config leaves off
    MetricsLogger(tmp_path / "d" / "metrics.jsonl", {"mode": "disabled"}, "r", {}, enabled=True).close()
    assert not (tmp_path / "d" / "wandb").exists()
    monkeypatch.delenv("WANDB_MODE")
    with pytest.raises(ConfigError, match=r"logging.wandb.mode=online: .*API key.*logging.wandb.mode=offline"):
        MetricsLogger(tmp_path / "c" / "metrics.jsonl", {"mode": "online"}, "r", {}, enabled=True)


def test_the_training_bar_leaves_tqdms_variables_to_tqdm_and_redraws_seldom_into_a_file(monkeypatch):
    """``disable=False`` passed on the main process had kept TQDM_DISABLE=1 from turning the bar off, and a CI or SLURM
    log got a line about 16 times a second."""
    from types import SimpleNamespace

    from alignlm.training.trainer import progress_bar

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    main, other = SimpleNamespace(is_main_process=True), SimpleNamespace(is_main_process=False)
    assert progress_bar(other) == {"disable": True}
    assert "disable" not in progress_bar(main) and progress_bar(main)["mininterval"] == 30.0
    assert progress_bar(main)["maxinterval"] == 30.0  # else tqdm's monitor thread redraws every ~15 s
    monkeypatch.setenv("TQDM_MININTERVAL", "1")
    assert "mininterval" not in progress_bar(main)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("TQDM_MININTERVAL")
    assert "mininterval" not in progress_bar(main)


def test_metrics_rows_hold_null_where_a_value_is_not_finite(tmp_path):
    """Every value of metrics.jsonl, a probe's NaN CKA included, is strict JSON: a bare NaN made jq and pandas refuse
    the line (the trainer nulled its own non-finite losses, not the monitor's metrics)."""
    from alignlm.training.logging import MetricsLogger

    logger = MetricsLogger(tmp_path / "metrics.jsonl", None, "r", {}, enabled=True)
    logger.log({"loss/total": 1.5, "monitor/pooled/cka": float("nan"), "grad_norm": float("inf")}, step=1)
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}"))
    assert row == {"step": 1, "loss/total": 1.5, "monitor/pooled/cka": None, "grad_norm": None}


@RANKS
def test_data_parallel_two_processes_matches_one(colour_set, tmp_path, monkeypatch):
    """Two gloo processes (per-device 2) == one process accumulating 2 micro-batches of 2: same global batch.

    ``--cpu`` means the CPU for every rank, also on a GPU machine; the one-process run is pinned there too."""
    base = tiny_overrides(
        colour_set, tmp_path, "run=[pretrain]", "stages.pretrain.max_steps=4", "stages.pretrain.per_device_batch_size=2"
    )
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "train.py"),
    ]
    ddp = [*launch, *base, "run_name=ddp", "logging.peak_tflops=1"]  # MFU: per device, over both ranks' peak
    subprocess.run(ddp, cwd=ROOT, check=True, capture_output=True, timeout=300)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    run(compose(*base, "run_name=one", "stages.pretrain.grad_accum=2"))
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["stages"]["pretrain"]["world_size"] == 2  # really two ranks, not two lone processes
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    for figures in [summary["stages"]["pretrain"], *rows]:
        assert figures["mfu"] == pytest.approx(figures["tflops"] / 2)
    assert read_losses(tmp_path / "ddp" / "pretrain") == pytest.approx(
        read_losses(tmp_path / "one" / "pretrain"), rel=1e-5
    )


def test_bad_images_are_skipped_counted_and_reported(tmp_path):
    """Missing images never crash a run: a batch made only of bad samples is skipped, and the count is reported."""
    from tests.conftest import edited_colour_set, pretrain_on

    def edit(records: list[dict]) -> None:
        for r in records[2:]:
            r["image"] = "images/missing.png"

    sets = edited_colour_set(tmp_path / "d", edit)
    steps = ["stages.pretrain.max_steps=4", "stages.pretrain.per_device_batch_size=2"]
    summary = run(compose(*pretrain_on(sets, tmp_path, *steps, "stages.pretrain.data.group_by_length=false")))
    assert summary["stages"]["pretrain"]["skipped"] == 6  # one epoch of 4 steps visits every record once
    assert len(read_losses(tmp_path / "t" / "pretrain")) < 4  # steps with only bad samples did not train
    with pytest.raises(Exception, match="missing.png"):
        run(compose(*pretrain_on(sets, tmp_path, "run_name=strict", *steps, "stages.pretrain.data.on_error=raise")))


def test_meter_measures_steps_by_when_they_ran(monkeypatch):
    """Counts arrive in batches long after their steps ran; the rate is work over the steps' own time span."""
    from alignlm.training import throughput

    clock = iter([100.0, 113.0])  # construction, then the settle after the fetch
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    meter = throughput.Meter(warmup=1)
    for at in (101.0, 104.0, 107.0, 110.0):  # 4 steps issued 3 s apart, their counts all fetched at 113 s
        meter.add(4, 40, at=at, flops=300.0)
    meter.settle()
    assert meter.rates() == pytest.approx((12 / 12.0, 120 / 12.0, 900 / 12.0))  # 3 steps after the warm-up one
    assert meter.steady_totals() == pytest.approx([12, 120, 900, 12.0])


def test_steady_rates_leave_checkpoint_writes_out(colour_set, tmp_path, monkeypatch):
    """A checkpoint written between steps counted as training time: at save_every=1 the tiny model's steady tokens/s
    fell 4x, and a 7B run's (100 GB a checkpoint) would fall by its minutes of writing."""
    from alignlm.training import throughput
    from alignlm.training.trainer import Trainer

    clock = iter([100.0, 113.0, 149.0])  # construction, a settle, then a save's 30 s and one more step
    with monkeypatch.context() as patched:
        patched.setattr(throughput.time, "perf_counter", lambda: next(clock))
        meter = throughput.Meter(warmup=1)
        for at in (101.0, 104.0, 107.0, 110.0):
            meter.add(4, 40, at=at)
        meter.settle()
        meter.leave_out(30.0)
        meter.add(4, 40, at=146.0)  # issued after the save
        meter.settle()
    assert meter.rates()[0] == pytest.approx(16 / (149.0 - 101.0 - 30.0))  # 4 steps after the warm-up one

    saves: list[float] = []
    save, leave_out = Trainer.save_checkpoint, throughput.Meter.leave_out

    def slow_save(self, *args, **kwargs):
        time.sleep(0.3)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save_checkpoint", slow_save)
    monkeypatch.setattr(throughput.Meter, "leave_out", lambda self, s: (saves.append(s), leave_out(self, s)))
    run(
        compose(
            *tiny_overrides(colour_set, tmp_path),
            "run=[pretrain]",
            "eval.sets=[]",
            "stages.pretrain.max_steps=5",
            "stages.pretrain.save_every=2",
        )
    )
    assert len(saves) == 2 and min(saves) >= 0.3  # steps 2 and 4; the last step's is final/, after the rates


def test_a_resumed_stages_rates_cover_every_segments_steady_state(monkeypatch):
    """summary.json's rates of a stopped and resumed stage are its segments' steady states together: they had been
    the last segment's alone, its start-up included when it ended within its warm-up (a requeued job's last minutes)."""
    from alignlm.training import throughput

    clock = iter([200.0, 260.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    meter = throughput.Meter(warmup=3, earlier=[12, 120, 900, 12.0])  # the first segment's, from its checkpoint
    meter.add(4, 40, at=250.0, flops=300.0)  # one slow step (start-up), still within this segment's warm-up
    meter.settle()
    assert meter.rates() == pytest.approx((4 / 60.0, 40 / 60.0, 300 / 60.0))  # the segment's own, overall
    assert meter.stage_rates() == pytest.approx((1.0, 10.0, 75.0))  # the steady state the stage had
    assert meter.steady_totals() == pytest.approx([12, 120, 900, 12.0])  # nothing of the warm-up is kept


def test_a_steps_model_flops_charge_the_lm_head_per_supervised_position(colour_set, tmp_path, monkeypatch):
    """alignlm computes logits only where a label is: a step's model FLOPs charge the head for its supervised
    positions, the rest of the weights for every real token (the head had been charged at every token, MFU 5 % high
    at the 1.1B finetune's shape and 32k words)."""
    from types import SimpleNamespace

    from alignlm.training import throughput
    from alignlm.training.trainer import Trainer

    supervised: list[int] = []
    charged: list[tuple[float, float, float]] = []
    added: list[float] = []
    returned: list[float] = []
    step, step_flops, add = Trainer.step, Trainer.step_flops, throughput.Meter.add

    def counting_step(self, micro, i):
        supervised.append(sum(len(b["lm_targets"]) for b in micro))
        return step(self, micro, i)

    def counting_flops(self, tokens, targets, pairs):
        charged.append((tokens, targets, pairs))
        assert self.flops_per_target > 0
        flops = step_flops(self, tokens, targets, pairs)
        returned.append(flops)
        return flops

    monkeypatch.setattr(Trainer, "step", counting_step)
    monkeypatch.setattr(Trainer, "step_flops", counting_flops)
    monkeypatch.setattr(throughput.Meter, "add", lambda self, *a, **k: (added.append(a[3]), add(self, *a, **k)))
    run(compose(*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=3"))
    assert [targets for _, targets, _ in charged] == supervised  # one process: the step's own supervised tokens
    assert all(targets < tokens for tokens, targets, _ in charged) and added == returned  # the meter counts them
    coefficients = SimpleNamespace(flops_per_token=2.0, flops_per_target=3.0, flops_per_pair=5.0)
    coefficients.step_flops = lambda *counts: step_flops(coefficients, *counts)
    assert step_flops(coefficients, 100, 7, 1000) == 100 * 2.0 + 7 * 3.0 + 1000 * 5.0
    # a checkpoint written before: attended pairs where FLOPs are now, its segments counted as they were then
    old = {"steady": [12, 120, 900, 12.0]}
    assert Trainer.earlier_steady(coefficients, old) == [12, 120, 120 * 2.0 + 120 * 3.0 + 900 * 5.0, 12.0]
    assert Trainer.earlier_steady(coefficients, {"throughput": [12, 120, 7.5e9, 12.0], **old}) == [12, 120, 7.5e9, 12.0]
    assert Trainer.earlier_steady(coefficients, {}) is None


def test_data_workers_count_the_cpus_this_process_may_use_on_its_node(monkeypatch):
    """A SLURM job with --cpus-per-task gets that many CPUs of a bigger machine, shared by the ranks of its node only."""
    import os

    from alignlm.data.images import local_processes, usable_cpus

    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        monkeypatch.setattr(os, "cpu_count", lambda: 128)
        assert usable_cpus() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert local_processes(16) == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_processes(2) == 2


def test_warmup_counts_its_steps_as_transformers_trainer_does():
    """Rounded up (LLaVA-1.5's 2,180 steps at 0.03: 66, where rounding to nearest gave 65; 10 steps at 0.03: 1, not 0),
    from the product rounded to 6 places (100 x 0.03 is 3, not 4)."""
    from alignlm.training.optim import warmup_steps

    cases = [(0.03, 2180, 66), (0.03, 10, 1), (0.05, 50, 3), (0.03, 100, 3), (0.0, 10, 0), (0.3, 10, 3)]
    assert [warmup_steps(ratio, total) for ratio, total, _ in cases] == [want for _, _, want in cases]


def test_the_logged_learning_rate_is_the_one_each_update_used_per_group(colour_set, tmp_path):
    """Each row's ``lr`` is the rate its own update used, of the first group (the connector), and every group's rate
    is logged by name: it was the next step's rate (the last row read 0 under a decaying schedule) of the last group
    (here the contrastive temperature's, ten times the connector's)."""
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path),
        "run=[pretrain]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=4",
        "stages.pretrain.warmup_ratio=0",
        "stages.pretrain.scheduler=linear",
        "+objective@stages.pretrain.objectives.contrastive=contrastive",
        "stages.pretrain.lr.connector=1e-3",
        "stages.pretrain.lr.objectives=1e-2",
        "logging.every=1",
    )
    run(cfg)
    rows = [json.loads(r) for r in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    decay = [1 - s / 4 for s in range(4)]  # the linear schedule at the step each update runs in
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * d for d in decay])
    assert [r["lr/connector"] for r in rows] == pytest.approx([1e-3 * d for d in decay])
    assert [r["lr/objectives"] for r in rows] == pytest.approx([1e-2 * d for d in decay])


def test_the_samples_an_epoch_leaves_over_are_announced(colour_set, tmp_path):
    """Every global batch is whole, so an epoch of a size that is not a multiple of it leaves its last few samples
    of its own order out (as drop_last); the stage's start says how many instead of saying nothing."""
    size = len(json.loads(Path(colour_set["pretrain"]).read_text()))
    batch = next(b for b in (5, 7, 9, 11) if size % b)
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path),
        "run=[pretrain]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=1",
        f"stages.pretrain.per_device_batch_size={batch}",
    )
    import logging

    records: list[logging.LogRecord] = []
    catch = logging.Handler(logging.WARNING)
    catch.emit = records.append
    logging.getLogger("alignlm").addHandler(catch)  # it does not propagate to the root logger
    try:
        run(cfg)
    finally:
        logging.getLogger("alignlm").removeHandler(catch)
    said = [r.getMessage() for r in records if "left over" in r.getMessage()]
    assert said and f"the {size % batch} left over" in said[0] and f"of its {size} samples" in said[0]


def text_only_records(path: Path, n: int = 4) -> Path:
    """``n`` records without an image: a micro-batch of them has no image-caption pair."""
    turns = [{"from": "human", "value": "Say it."}, {"from": "gpt", "value": "A word."}]
    path.write_text(json.dumps([{"id": f"text{i}", "conversations": turns} for i in range(n)]))
    return path


def test_every_step_logs_the_same_keys_and_a_metric_averages_over_the_micro_batches_that_measured_it(
    colour_set, tmp_path
):
    """Data-parallel ranks all-reduce their logged values as one table: a micro-batch without an image-caption pair
    (contrastive and VLAP then measured nothing) dropped their metric keys on its rank, and the ranks reduced tables of
    different widths (gloo aborted; NCCL may mix columns). Every step now logs every key; a metric is the mean over the
    micro-batches that measured it, not averaged with zeros for those that did not."""
    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer

    text = text_only_records(tmp_path / "text_only.json")
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path, "run=[pretrain]"),
        f"stages.pretrain.data.sources=[{{path:{colour_set['pretrain']}}},{{path:{text}}}]",
        "+objective@stages.pretrain.objectives.contrastive=contrastive",
        "+objective@stages.pretrain.objectives.vlap=vlap",
        "stages.pretrain.lr.connector=0",  # the model stays as it is: the same micro-batch measures the same
        "stages.pretrain.lr.objectives=0",
    )
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    trainer.setup()
    data, collate = trainer.dataset, trainer.collator()
    with_images = collate([data[i] for i in range(len(data)) if data[i]["n_images"]][:4])
    text_only = collate([data[i] for i in range(len(data)) if not data[i]["n_images"]][:4])
    logs = [
        trainer.step(micro, step)
        for step, micro in enumerate([[text_only], [with_images], [with_images, text_only]], 1)
    ]
    assert logs[0].device.keys() == logs[1].device.keys() == logs[2].device.keys()
    assert logs[0].measured.keys() == logs[1].measured.keys() and logs[0].measured["contrastive/i2t_acc"] == 0
    rows = {step: row for step, row, *_ in trainer.fetch(logs)}
    pair_metrics = ["contrastive/i2t_acc", "contrastive/t2i_acc", "vlap/assign_agree", "vlap/pred_agree"]
    assert all(rows[1][k] is None for k in pair_metrics) and rows[1]["contrastive/temperature"] > 0
    assert all(rows[3][k] == pytest.approx(rows[2][k]) for k in [*pair_metrics, "contrastive/temperature"])


@RANKS
def test_two_ranks_whose_micro_batches_differ_in_image_caption_pairs_log_together(tmp_path):
    """The run behind the test above, on 2 gloo ranks: half the records text-only, so at some step one rank's
    micro-batch has pairs and the other's none; gloo aborted it with "Received data size doesn't match"."""
    from tests.test_cluster import torchrun

    sets = write_colour_set(tmp_path / "data", n=12)
    text = text_only_records(tmp_path / "text_only.json", n=12)
    proc = torchrun(
        [
            *tiny_overrides(sets, tmp_path, "run=[pretrain]", "eval.sets=[]", "logging.every=1"),
            f"stages.pretrain.data.sources=[{{path:{sets['pretrain']}}},{{path:{text}}}]",
            "stages.pretrain.max_steps=3",
            "stages.pretrain.per_device_batch_size=2",
            "stages.pretrain.save_every=0",
            "stages.pretrain.data.group_by_length=false",
            "+objective@stages.pretrain.objectives.contrastive=contrastive",
            "+objective@stages.pretrain.objectives.vlap=vlap",
        ],
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(r) for r in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["contrastive/temperature"] > 0 for r in rows)


def _probe_file(colour_set, path: Path, n: int) -> Path:
    path.write_text(json.dumps(json.loads(colour_set["pretrain"].read_text())[:n]))
    return path


def test_a_probe_file_too_small_for_the_monitors_knn_metrics_is_refused_at_set_up(colour_set, tmp_path, tiny_model):
    """8 usable pairs for topk=10: the config check compares monitor.n (64) with topk, so the run trained step 1 and
    then died in the monitor with an error naming no setting. Now the monitor refuses it when it is built."""
    from alignlm.config import ConfigError
    from alignlm.training.monitor import AlignmentMonitor

    model = tiny_model()
    probe = _probe_file(colour_set, tmp_path / "probe8.json", 8)
    cfg = {"every": 2, "probe": str(probe), "image_root": str(colour_set["pretrain"].parent), "n": 64, "topk": 10}
    match = r"monitor.probe=.*probe8.json gives 8 usable .*monitor.n=64.*monitor.topk \+ 2 = 12 .*'mutual_knn'"
    with pytest.raises(ConfigError, match=match):
        AlignmentMonitor(cfg, model)
    with pytest.raises(ConfigError, match=r"the kNN metrics \['cknna'\]"):  # asked for the LLM's layers only
        AlignmentMonitor({**cfg, "metrics": ["cka"], "layers": [-1], "layer_metrics": ["cknna"]}, model)
    assert AlignmentMonitor({**cfg, "topk": 6}, model).topk == 6
    assert AlignmentMonitor({**cfg, "metrics": ["modality_gap", "cka"]}, model).metrics == ["modality_gap", "cka"]


def test_a_bare_monitor_layer_index_is_refused_naming_the_key(colour_set, tmp_path, tiny_model):
    """``monitor.layers=-1`` (not ``[-1]``) was a TypeError, 'int' object is not iterable."""
    from alignlm.config import ConfigError
    from alignlm.training.monitor import AlignmentMonitor

    cfg = {"every": 2, "probe": str(colour_set["pretrain"]), "n": 8, "topk": 4, "layers": -1}
    with pytest.raises(ConfigError, match=r"monitor.layers=-1: .* as a list such as \[0, -1\]"):
        AlignmentMonitor(cfg, tiny_model())
    assert AlignmentMonitor({**cfg, "layers": [-1]}, tiny_model()).layers == [2]


def test_the_monitor_changes_no_training_loss_of_a_lora_stage_with_dropout(colour_set, tmp_path):
    """Measuring every step (eval mode, its own RNG) leaves each loss of a stage whose dropout draws from the RNG
    bit-identical."""
    probe = [f"monitor.probe={colour_set['pretrain']}", "monitor.n=8", "monitor.topk=4", "monitor.every=1"]
    losses = {}
    for name, monitor in (("off", []), ("on", probe)):
        lora = ["stages.pretrain.parts.llm=lora", "stages.pretrain.lora.dropout=0.3", "stages.pretrain.lr.llm=1e-2"]
        knobs = ["run=[pretrain]", "stages.pretrain.max_steps=3", "stages.pretrain.save_every=0", f"run_name={name}"]
        run(compose(*tiny_overrides(colour_set, tmp_path, *knobs, *lora, *monitor)))
        losses[name] = read_losses(tmp_path / name / "pretrain")
    assert losses["on"] == losses["off"] and len(losses["on"]) == 3


def test_grad_norm_is_logged_with_clipping_off(colour_set, tmp_path):
    """max_grad_norm=0 turns clipping off, not the gradient norm's column: without clipping it is the first sign of a
    diverging run (it had gone from every row)."""
    run(compose(*tiny_overrides(colour_set, tmp_path, "run=[pretrain]", "stages.pretrain.max_steps=2",
                                "stages.pretrain.max_grad_norm=0", "eval.sets=[]", "logging.every=1")))  # fmt: skip
    rows = [json.loads(r) for r in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)


class _FreezeCount(torch.utils.data.Dataset):
    """Each item: how many objects the collector of the process reading it holds frozen."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        import gc

        return gc.get_freeze_count()


def test_data_workers_are_forked_with_the_collectors_objects_frozen_and_the_rank_is_not():
    """A forked worker's full collection wrote the header of every object it inherited (the dataset's records), so it
    came to hold its own copy of them (80 MB a worker on 100k packed LLaVA-665k-like records, 4 MB frozen). Workers are
    now forked frozen; the rank unfreezes at once, so its own cycles are still collected."""
    import gc

    from alignlm.training.trainer import start_workers

    loader = torch.utils.data.DataLoader(_FreezeCount(), batch_size=None, num_workers=1, persistent_workers=True)
    frozen_in_worker = list(start_workers(loader))
    assert min(frozen_in_worker) > 0 and gc.get_freeze_count() == 0
    assert list(start_workers(torch.utils.data.DataLoader(_FreezeCount(), batch_size=None))) == [0, 0]
    gc.freeze()  # a caller's own freeze is left as it is
    try:
        start_workers(torch.utils.data.DataLoader(_FreezeCount(), batch_size=None, num_workers=1))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
