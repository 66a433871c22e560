"""The defaults a user gets without asking: which device a name means, which weights half precision stores, the
optimizer's settings and schedule, deterministic mode's switches, and the data loader's workers on a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from alignlm.data import images
from alignlm.models.device import device_problem
from alignlm.models.precision import frozen_linears, store_weight
from alignlm.training import trainer
from alignlm.training.determinism import deterministic, strict, warn_only
from alignlm.training.optim import build_optimizer, lr_lambda
from alignlm.training.sampler import StepSampler
from alignlm.training.trainer import Trainer, start_scaler_afresh
from tests.conftest import compose, tiny_overrides


def test_a_gpu_index_past_the_last_is_refused_before_anything_loads(monkeypatch):
    """``cuda:2`` on a two-GPU machine names no GPU: said up front, not as torch's error after a model was loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problem("cuda:1") is None
    assert device_problem("cuda:2") == "this machine has 2 CUDA devices"


def test_half_precision_storage_leaves_a_tied_head_and_biases_alone():
    """A head tied to the token embeddings is also read by lookup, which autocast does not cast: stored in half
    precision it would change the embeddings. A bias keeps its dtype (ZeRO-3 adds it in its own dtype)."""
    table = nn.Embedding(10, 4)
    tied, free = nn.Linear(4, 10, bias=False), nn.Linear(4, 4)
    tied.weight = table.weight
    model = nn.ModuleDict({"table": table, "tied": tied, "free": free}).requires_grad_(False)
    assert frozen_linears(model) == [free]
    store_weight(free, torch.bfloat16)
    assert free.weight.dtype == torch.bfloat16 and free.bias.dtype == torch.float32


def test_fp16_stores_only_the_frozen_linear_layers_of_lora_parts_in_half_precision(tiny_model):
    """Under fp16 whole frozen parts stay as they are (an fp16 norm or embedding changes the step's numbers); only a
    LoRA-adapted part's frozen linear layers, which autocast casts at every use anyway, are stored in fp16."""
    model = tiny_model()
    model.requires_grad_(False)
    model.frozen_parts = {"vision", "llm"}  # as the stage's parts make them
    stage = SimpleNamespace(parts={"vision": "frozen", "connector": "full", "llm": "frozen"})
    fake = SimpleNamespace(acc=SimpleNamespace(mixed_precision="fp16"), saved_parts=["connector"], stage=stage)
    Trainer._store_frozen_in_half_precision(fake, model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_each_stage_starts_from_the_loss_scalers_initial_state():
    """fp16's scaler is one object for every stage of a run: a stage starts at its initial scale, not at the last
    stage's, so a rerun that skips a finished stage skips the same steps."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    start_scaler_afresh(scaler)
    scaler.scale(torch.ones(()))  # a step's backward
    scaler.update(4.0)
    assert scaler.get_scale() == 4.0
    start_scaler_afresh(scaler)
    assert scaler.get_scale() == 2.0**16


def test_adamw_takes_eps_1e_8_and_warms_up_over_3_percent_by_default(tiny_model):
    """AdamW's eps and the warm-up ratio where a stage config names none: LLaVA's (transformers' Trainer's) values.
    The warm-up's first update already moves the weights (1 / warmup of the rate)."""
    model = tiny_model()
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    optimizer, scheduler = build_optimizer(model, {"lr": {"connector": 1.0}}, total_steps=100, fused=False)
    assert optimizer.defaults["eps"] == 1e-8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 / 3)  # 3 warm-up steps of 100
    assert [lr_lambda(10, 4)(step) for step in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_fused_optimizer_auto_leaves_the_choice_to_where_the_parameters_are(colour_set, tmp_path, monkeypatch):
    """``fused_optimizer: auto`` asks for no kernel: ``build_optimizer`` fuses where every parameter is on CUDA."""
    asked = []
    build = trainer.build_optimizer
    monkeypatch.setattr(trainer, "build_optimizer", lambda *a, **k: (asked.append(k["fused"]), build(*a, **k))[1])
    trainer_run = compose(*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]")
    trainer_run.stages.pretrain.max_steps = 1
    from alignlm.pipeline import run  # noqa: PLC0415 - the pipeline's whole import only where a run is made

    run(trainer_run)
    assert asked == [None]


def test_deterministic_mode_keeps_the_users_cublas_setting_and_turns_cudnn_autotuning_off(monkeypatch):
    """A workspace setting the user exported is theirs; cuDNN's autotuner picks kernels by timing (another result
    each run), so it is off inside; a block that only warns puts strict mode back at its end."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic(True):
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
        import os  # noqa: PLC0415 - read inside the block, where the mode set it

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        with warn_only():
            assert not strict()
        assert strict()


def test_a_gpu_ranks_loader_shares_the_nodes_cpus_and_keeps_its_workers_fed(monkeypatch):
    """On CUDA each rank decodes images in ``CPUs / ranks on the node`` workers (8 ranks on 16 CPUs: 2 each, not 8
    each), kept alive across epochs, 4 batches ahead, into pinned memory; on the CPU none, as workers would take the
    cores the model runs on."""
    monkeypatch.setattr(images, "usable_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    cuda = torch.device("cuda", 0)
    assert images.loader_workers("auto", cuda, 8) == 2
    assert images.loader_workers("auto", torch.device("cpu"), 8) == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # a launcher that does not say: every rank on this node
    fake = SimpleNamespace(
        stage=SimpleNamespace(data={"num_workers": "auto"}),
        acc=SimpleNamespace(device=cuda, num_processes=8, process_index=0),
        order=StepSampler(64, 2, 8, 0, 1, 0, total_steps=0),
        total_steps=4,
        start_step=0,
        dist={},
        dataset=SimpleNamespace(hooks=()),
        collator=lambda hooks: None,
        cfg=SimpleNamespace(seed=0),
    )
    loader = Trainer.loader(fake)
    assert loader.num_workers == 2 and loader.pin_memory and loader.persistent_workers and loader.prefetch_factor == 4
