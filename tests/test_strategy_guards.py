"""The distributed strategies' settings, checked at unit level on the CPU: DeepSpeed's config as alignlm writes it, the
environment DeepSpeed runs in, the strategy an accelerate launch config picks against the ``launcher=`` preset of the
same name, FSDP2's units, and the precision of a CPU launch on a GPU machine."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from alignlm import pipeline
from alignlm.config import config_dir
from alignlm.pipeline import launch_strategy, make_accelerator, resolve_strategy
from alignlm.training import sharding, zero
from alignlm.training import trainer as trainer_module
from alignlm.training.trainer import Trainer
from tests.conftest import compose, tiny_overrides

# what an accelerate launch config passes to the ranks about the strategy (accelerate/utils/launch.py)
LAUNCH_VARS = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "ACCELERATE_GRADIENT_CLIPPING",
    "ACCELERATE_USE_FSDP",
    "FSDP_VERSION",
    "FSDP_RESHARD_AFTER_FORWARD",
    "FSDP_OFFLOAD_PARAMS",
    "FSDP_ACTIVATION_CHECKPOINTING",
    "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD",
    "ACCELERATE_MIXED_PRECISION",
)
# the accelerate launch configs that pick a strategy, each beside the launcher preset of the same name
SHARDED_LAUNCHES = ("fsdp2", "zero2", "zero3", "zero3_offload")
STRATEGY_KNOBS = ("strategy", "reshard_after_forward", "offload_optimizer", "offload_param")


@pytest.fixture
def plain_launch(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No accelerate launch config in the environment (a test sets the one it wants)."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _flag(value: object) -> str:
    return str(value).lower()


def accelerate_env(name: str) -> dict[str, str]:
    """The strategy variables ``accelerate launch --config_file configs/accelerate/<name>.yaml`` exports to each rank,
    as accelerate writes them (``prepare_deepspeed_cmd_env``, ``prepare_multi_gpu_env``)."""
    launch = OmegaConf.to_container(OmegaConf.load(config_dir() / "accelerate" / f"{name}.yaml"))
    if launch["distributed_type"] == "DEEPSPEED":
        ds = launch["deepspeed_config"]
        env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(ds["zero_stage"])}
        for key in ("offload_optimizer_device", "offload_param_device"):
            if key in ds:
                env[f"ACCELERATE_DEEPSPEED_{key.upper()}"] = _flag(ds[key])
        if "zero3_init_flag" in ds:
            env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = _flag(ds["zero3_init_flag"])
        return env
    assert launch["distributed_type"] == "FSDP", name
    fsdp = launch["fsdp_config"]
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(fsdp.get("fsdp_version", 1))}
    for key in ("reshard_after_forward", "offload_params", "activation_checkpointing"):
        if f"fsdp_{key}" in fsdp:
            env[f"FSDP_{key.upper()}"] = _flag(fsdp[f"fsdp_{key}"])
    return env


# ----------------------------------------------------------------------------------------- DeepSpeed's config


def test_deepspeed_clips_at_the_stages_max_grad_norm():
    """DeepSpeed's ``gradient_clipping`` is the stage's ``max_grad_norm``: a stage clipping at 0.5 must not train
    clipped at DeepSpeed's or any other fixed norm."""
    config = zero.deepspeed_config("zero2", {}, 2, 3, 4, 0.5, "no")
    assert config["gradient_clipping"] == 0.5
    assert config["train_batch_size"] == 2 * 3 * 4


def test_offload_param_puts_the_zero3_parameters_on_the_cpu():
    """``distributed.offload_param=true`` (``launcher=zero3_offload``) tells DeepSpeed to keep the parameters on the
    CPU between uses; dropped, ZeRO-3 keeps them on the GPU and the memory the user offloaded is used after all."""
    config = zero.deepspeed_config("zero3", {"offload_param": True, "offload_optimizer": True}, 1, 1, 1, 1.0, "no")
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert "offload_param" not in zero.deepspeed_config("zero3", {}, 1, 1, 1, 1.0, "no")["zero_optimization"]


def test_a_deepspeed_json_section_that_is_partly_auto_is_refused_where_alignlm_owns_it(tmp_path):
    """A DeepSpeed JSON section alignlm sets itself (``fp16``) is dropped only when all of it is ``auto``; one with a
    value of its own (``initial_scale_power: 12``) is refused, since alignlm's setting would silently replace it."""
    partly = tmp_path / "partly.json"
    partly.write_text(json.dumps({"fp16": {"enabled": "auto", "initial_scale_power": 12}}))
    with pytest.raises(ValueError, match=r"sets \['fp16'\], which alignlm sets itself, from mixed_precision"):
        zero.deepspeed_config("zero2", {"deepspeed_config": str(partly)}, 1, 1, 1, 1.0, "no")
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps({"fp16": {"enabled": "auto", "loss_scale": "auto"}, "gradient_clipping": "auto"}))
    config = zero.deepspeed_config("zero2", {"deepspeed_config": str(whole)}, 1, 1, 1, 1.0, "no")
    assert "fp16" not in config and config["gradient_clipping"] == 1.0


def test_cpu_ranks_run_deepspeed_on_its_cpu_accelerator_only_while_inside(monkeypatch):
    """CPU ranks get ``DS_ACCELERATOR=cpu`` (else DeepSpeed picks a GPU the machine has for its buffers) and
    ``LOCAL_RANK``, both removed afterwards so that no process started later inherits them."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with zero.launcher_env(active=True, cpu=True):
        assert os.environ.get("DS_ACCELERATOR") == "cpu"
        assert os.environ.get("LOCAL_RANK") == "0"
    assert "DS_ACCELERATOR" not in os.environ and "LOCAL_RANK" not in os.environ
    with zero.launcher_env(active=True, cpu=False):
        assert "DS_ACCELERATOR" not in os.environ
    assert "LOCAL_RANK" not in os.environ


class _Head(nn.Module):
    """An LLM's stand-in: just an output head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 8, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.llm = _Head()


@pytest.mark.parametrize(("strategy", "registered"), [("zero3", True), ("zero2", False)])
def test_zero3_registers_the_lm_head_as_an_external_parameter(monkeypatch, strategy, registered):
    """Under ZeRO-3 the LM head's weight, which the chunked loss reads outside the head's forward, is registered as an
    external parameter of the model, so that DeepSpeed gathers it there; ZeRO-2 keeps parameters whole and does not."""
    calls = []
    fake = types.ModuleType("deepspeed")
    fake.init_distributed = lambda dist_backend: None
    fake.initialize = lambda model, optimizer, config: ("engine", "zero optimizer", None, None)
    fake.zero = types.SimpleNamespace(register_external_parameter=lambda module, p: calls.append((module, p)))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a, **k: "gloo")
    model = _Model()
    config = zero.deepspeed_config(strategy, {}, 1, 1, 1, 1.0, "no")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert zero.initialize(model, nn.ModuleDict(), optimizer, config) == ("engine", "zero optimizer")
    assert calls == ([(model, model.llm.head.weight)] if registered else [])


def test_an_offloaded_optimizer_is_built_unfused(colour_set, tmp_path, monkeypatch):
    """With the optimizer state offloaded to the CPU, the AdamW DeepSpeed steps there must be built unfused (a fused
    AdamW needs its state on the GPU), whatever ``fused_optimizer: auto`` would pick."""
    asked = {}

    class Built(Exception):
        pass

    def recorder(*args, **kwargs):
        asked.update(kwargs)
        raise Built

    monkeypatch.setattr(trainer_module, "build_optimizer", recorder)
    cfg = compose(*tiny_overrides(colour_set, tmp_path, "run=[pretrain]", "launcher=zero3_offload"))
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    try:
        with pytest.raises(Built):
            trainer.setup()
    finally:
        trainer.release()
    assert asked["fused"] is False


# ----------------------------------------------------------------------------------------- accelerate's launch config


def test_an_fsdp_launch_config_without_resharding_said_reshards(plain_launch):
    """accelerate's FSDP default is to reshard after the forward; a launch config that does not say must get the
    same, as ``launcher=fsdp2`` does."""
    plain_launch.setenv("ACCELERATE_USE_FSDP", "true")
    plain_launch.setenv("FSDP_VERSION", "2")
    assert launch_strategy() == ("fsdp2", {"reshard_after_forward": True})


def test_an_optimizer_offload_in_alignlms_config_stays_on_under_a_launch_config_without_one(plain_launch):
    """Launched with configs/accelerate/zero3.yaml (offload devices ``none``), ``distributed.offload_optimizer=true``
    given to alignlm stays on: the launch config's ``none`` says nothing against it."""
    for var, value in accelerate_env("zero3").items():
        plain_launch.setenv(var, value)
    cfg = compose("distributed.offload_optimizer=true")
    resolve_strategy(cfg)
    assert cfg.distributed.strategy == "zero3"
    assert cfg.distributed.offload_optimizer is True
    assert cfg.distributed.offload_param is False


@pytest.mark.parametrize("name", ["fsdp2", "zero3"])
def test_accelerate_is_kept_from_wrapping_the_model_after_the_strategy_is_read(plain_launch, name):
    """Once alignlm has read the launch config's strategy it wraps the model itself; the variables that would make
    accelerate wrap it a second time are removed from the environment."""
    for var, value in accelerate_env(name).items():
        plain_launch.setenv(var, value)
    cfg = compose()
    resolve_strategy(cfg)
    assert cfg.distributed.strategy == name
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ
    assert "ACCELERATE_USE_FSDP" not in os.environ


@pytest.mark.parametrize("name", SHARDED_LAUNCHES)
def test_an_accelerate_launch_config_picks_the_same_strategy_as_the_launcher_preset_of_its_name(plain_launch, name):
    """configs/accelerate/<name>.yaml under ``launcher=auto`` and ``launcher=<name>`` on a plain launch are the two
    ways to pick a strategy: they must give the same strategy and the same offload and resharding switches."""
    by_launcher = compose(f"launcher={name}")
    resolve_strategy(by_launcher)
    for var, value in accelerate_env(name).items():
        plain_launch.setenv(var, value)
    by_accelerate = compose()
    resolve_strategy(by_accelerate)
    want = {key: by_launcher.distributed[key] for key in STRATEGY_KNOBS}
    assert {key: by_accelerate.distributed[key] for key in STRATEGY_KNOBS} == want
    assert want["strategy"] == name.removesuffix("_offload")


# ----------------------------------------------------------------------------------------- FSDP2's units


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp2_shards_the_tower_the_connector_and_every_decoder_layer_as_units(tiny_model, monkeypatch, reshard):
    """Under FSDP2 each decoder layer, the vision tower and the connector is a unit of its own (gathered for its own
    forward only), then the model as the root, each with the ``reshard_after_forward`` asked for."""
    model = tiny_model()
    sharded = []
    monkeypatch.setattr(sharding, "fully_shard", lambda module, **kwargs: sharded.append((module, kwargs)))
    monkeypatch.setattr(sharding, "init_device_mesh", lambda *args, **kwargs: "mesh")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 1)
    sharding.shard(model, torch.device("cpu"), reshard_after_forward=reshard)
    layers = sharding.decoder_layers(model.llm)
    assert len(layers) >= 2
    assert [id(m) for m, _ in sharded] == [id(m) for m in [*layers, model.vision, model.connector, model]]
    assert all(kwargs == {"mesh": "mesh", "reshard_after_forward": reshard} for _, kwargs in sharded)


# ----------------------------------------------------------------------------------------- precision


def test_auto_precision_of_a_cpu_launch_on_a_gpu_machine_is_fp32(monkeypatch):
    """``accelerate launch --cpu`` (``ACCELERATE_USE_CPU``) on a machine with a bf16 GPU trains on the CPU, so
    ``mixed_precision=auto`` must be ``no`` there; without the flag the same machine gets bf16."""
    made = []
    monkeypatch.setattr(pipeline, "Accelerator", lambda **kwargs: made.append(kwargs))
    monkeypatch.setattr(pipeline, "rejoin_process_group", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    make_accelerator(compose("mixed_precision=auto"))
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    make_accelerator(compose("mixed_precision=auto"))
    assert [(m["mixed_precision"], m["cpu"]) for m in made] == [("no", True), ("bf16", False)]
