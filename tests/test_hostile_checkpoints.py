"""A handed-over checkpoint or model folder is data, never code: its config may not read the environment, import
modules, fetch Hub kernels or expand into billions of values (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers.integrations.hub_kernels as hub_kernels
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from alignlm.config import ConfigError
from alignlm.models.build import build_model
from alignlm.models.io import UnsafeConfigError, config_yaml, load_checkpoint_config, safe_model_config
from tests.conftest import compose

KERNEL = "kernels-community/flash-attn"


@pytest.fixture
def kernel_fetches(monkeypatch) -> list[str]:
    """The Hub kernels transformers tried to fetch; the spy fetches nothing (no network)."""
    calls: list[str] = []

    def spy(repo_id: str, *args, **kwargs):
        calls.append(repo_id)
        raise RuntimeError(f"(spy) would download and run the Hub kernel {repo_id}")

    monkeypatch.setattr(hub_kernels, "get_kernel", spy)
    return calls


# ---- interpolations: OmegaConf's own grammar decides --------------------------------------------------------------


def test_literal_dollar_braces_and_backslashes_round_trip_through_a_checkpoint_config(tmp_path):
    """A literal ``\\${x}`` was written as is and read back as ``${x}``; a literal ``\\\\${x}`` read back as a live
    interpolation. Each input below is OmegaConf's escaped spelling of the literal beside it."""
    literals = {
        "one": "\\${x}",  # a backslash, then ${x}
        "two": "\\\\${x}",  # two backslashes, then ${x}
        "bare": "${x} and ${",  # never an interpolation once resolved
        "tail": "a\\ ${x}\\",  # backslashes elsewhere stay as they are
    }
    spelled = {"one": "\\\\\\${x}", "two": "\\\\\\\\\\${x}", "bare": "\\${x} and \\${", "tail": "a\\ \\${x}\\"}
    cfg = OmegaConf.create({**spelled, "rows": ["${one}", "${two}"]})
    assert OmegaConf.to_container(cfg, resolve=True) == {**literals, "rows": [literals["one"], literals["two"]]}
    (tmp_path / "config.yaml").write_text(config_yaml(cfg))
    back = OmegaConf.to_container(load_checkpoint_config(tmp_path / "config.yaml"), resolve=True)
    assert back == {**literals, "rows": [literals["one"], literals["two"]]}


@pytest.mark.parametrize(
    "value",
    [
        "\\\\${oc.env:ALIGNLM_TEST_SECRET}",  # an escaped backslash, then a live interpolation
        "x \\\\\\\\${oc.env:ALIGNLM_TEST_SECRET} y",  # two escaped backslashes, then a live one
        "\\${run} \\\\${oc.env:ALIGNLM_TEST_SECRET}",  # an escaped one first
    ],
)
def test_an_interpolation_behind_escaped_backslashes_is_refused(tmp_path, monkeypatch, value):
    """The old guard took ``\\\\${`` for an escaped ``${``: the secret went into an export's model card."""
    monkeypatch.setenv("ALIGNLM_TEST_SECRET", "hunter2")
    config = tmp_path / "config.yaml"
    config.write_text(f"run_name: t\nstages:\n  pretrain:\n    prompts:\n    - '{value}'\n")
    with pytest.raises(UnsafeConfigError, match=r"stages\.pretrain\.prompts\.0 holds the interpolation") as e:
        load_checkpoint_config(config)
    assert "hunter2" not in str(e.value)


# ---- _target_: decided by name, nothing imported that is not a part builder's module ------------------------------


def test_a_target_in_the_command_line_package_is_refused_without_running_it(monkeypatch):
    """Checking ``alignlm.commands.__main__.X`` imported that module, which runs the command line with the caller's
    arguments (``sys.exit(console())``): a library caller exited, ``alignlm export`` ran twice."""
    monkeypatch.setattr(sys, "argv", ["alignlm"])
    monkeypatch.delitem(sys.modules, "alignlm.commands.__main__", raising=False)
    for target in ("alignlm.commands.__main__.Connector", "alignlm.commands.export.Connector"):
        with pytest.raises(UnsafeConfigError, match=f"model.connector._target_='{target}' is not one of"):
            safe_model_config({"connector": {"_target_": target}})
    assert "alignlm.commands.__main__" not in sys.modules


@pytest.mark.parametrize(
    "target",
    ["alignlm.models._private.Connector", "alignlm.models.connectors.__init__.MLPConnector", "alignlm.pipeline.run"],
)
def test_a_target_outside_the_part_packages_or_naming_a_private_component_is_refused(target):
    with pytest.raises(UnsafeConfigError, match="is not one of alignlm's part classes or loaders"):
        safe_model_config({"connector": {"_target_": target}})


def test_every_part_target_of_the_shipped_configs_is_still_accepted():
    targets = [
        "alignlm.models.connectors.MLPConnector",
        "alignlm.models.connectors.LinearConnector",
        "alignlm.models.connectors.MoEConnector",
        "alignlm.methods.v2l.connector.V2LConnector",
        "alignlm.models.vision.HFVisionTower",
        "alignlm.models.vision.EfficientNetLiteTower",
        "alignlm.methods.revision.tower.DualEncoderTower",
        "alignlm.methods.aligngpt.part.AlignLevels",
        "alignlm.models.llm.pretrained",
        "alignlm.export.hf_llava.llm_from_llava",
    ]
    node = {f"p{i}": {"_target_": t} for i, t in enumerate(targets)}
    assert [safe_model_config(node)[f"p{i}"]._target_ for i in range(len(targets))] == targets


# ---- attention: never a Hub kernel chosen by a checkpoint or a folder ---------------------------------------------


@pytest.mark.parametrize("value", [{"": KERNEL}, {"text_config": KERNEL}, [KERNEL]])
def test_an_attention_that_is_not_a_name_is_refused(kernel_fetches, value):
    """transformers reads ``{"": "<org>/<repo>"}`` as that Hub kernel for the whole model: it passed a check of
    strings only and was fetched."""
    model = OmegaConf.to_container(compose().model, resolve=True)
    model["llm"]["attn_implementation"] = value
    model["llm"]["_convert_"] = "all"  # the loader gets a plain mapping, as transformers reads one
    with pytest.raises(UnsafeConfigError, match=r"model\.llm\.attn_implementation=.* is a (dict|list), not the name"):
        build_model(safe_model_config(model))
    assert kernel_fetches == []


@pytest.fixture
def llava_folder(tiny_model, tmp_path) -> Path:
    """A tiny transformers Llava folder (weights and config.json; no processor)."""
    from alignlm.export.hf_llava import to_llava

    folder = tmp_path / "llava"
    to_llava(tiny_model()).save_pretrained(folder)
    return folder


def _set_attention(folder: Path, where: str, value: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    (config[where] if where else config)["attn_implementation"] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("where", ["", "text_config"])
def test_a_llava_folder_naming_a_hub_kernel_for_attention_is_refused_before_it_is_fetched(
    llava_folder, tiny_model, kernel_fetches, where
):
    """``init_from`` a Llava folder and ``model=llava_hf`` built the model with the attention its config.json names:
    a Hub repository's kernels, downloaded and run. One named for a sub-config (``text_config``) is refused too:
    which of a config's and its sub-configs' attentions wins is transformers' to change."""
    from alignlm.export.hf_llava import llm_from_llava, load_llava_weights

    _set_attention(llava_folder, where, KERNEL)
    key = f"{where}.attn_implementation" if where else "attn_implementation"
    match = f"{llava_folder}/config.json: {key}='{KERNEL}' names a Hub repository"
    model = tiny_model()
    for attempt in (lambda: load_llava_weights(model, llava_folder), lambda: llm_from_llava(str(llava_folder))):
        with pytest.raises(ConfigError, match=match):
            attempt()
    assert kernel_fetches == []


def test_an_llm_folder_naming_a_hub_kernel_for_attention_is_refused_and_a_built_in_one_kept(tmp_path, kernel_fetches):
    from alignlm.models.llm import pretrained, tiny

    llm, tok = tiny()
    folder = tmp_path / "llm"
    llm.save_pretrained(folder)
    tok.save_pretrained(folder)
    _set_attention(folder, "", KERNEL)
    with pytest.raises(ConfigError, match=f"{folder}/config.json: attn_implementation='{KERNEL}' names a Hub"):
        pretrained(str(folder))
    assert kernel_fetches == []
    _set_attention(folder, "", "eager")  # no code: the folder's choice stands
    assert pretrained(str(folder))[0].config._attn_implementation == "eager"


# ---- YAML anchors and aliases -------------------------------------------------------------------------------------


def _alias_bomb(levels: int) -> str:
    """``levels`` lists of 10 aliases of the one before: a few hundred bytes, 10 ** (levels + 1) values loaded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"model: {{llm: *a{levels}}}"]) + "\n"


@pytest.mark.timeout(10)
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """293 bytes took 12 s to load, 352 bytes more than 100 s."""
    config = tmp_path / "config.yaml"
    config.write_text(_alias_bomb(4))
    start = time.perf_counter()
    with pytest.raises(UnsafeConfigError, match=r"line 1: a0 holds the YAML anchor &a0"):
        load_checkpoint_config(config)
    assert time.perf_counter() - start < 1


def test_a_single_alias_is_refused_naming_its_key(tmp_path):
    from alignlm.models.io import read_config_yaml

    config = tmp_path / "config.yaml"
    config.write_text("model:\n  llm:\n    layers: [1, 2, *x]\n")
    with pytest.raises(UnsafeConfigError, match=r"line 3: model\.llm\.layers\[2\] holds the YAML alias \*x"):
        read_config_yaml(config)


@pytest.mark.timeout(20)
def test_a_fifo_in_a_final_checkpoint_is_refused_not_waited_on(tmp_path):
    """A checkpoint copied from elsewhere with a FIFO as its config.yaml or model.safetensors (tar keeps FIFOs)
    blocked ``load_model``, and so ``eval`` and ``export``, for ever."""
    from alignlm.models.io import final_parts, read_config_yaml

    fifo = tmp_path / "final"
    fifo.mkdir()
    for name in ("config.yaml", "model.safetensors"):
        os.mkfifo(fifo / name)
    with pytest.raises(ValueError, match="config.yaml is not a regular file"):
        read_config_yaml(fifo / "config.yaml")
    with pytest.raises(ValueError, match="model.safetensors is not a regular file"):
        final_parts(fifo)


def test_a_written_config_has_no_anchor_and_reads_back_the_same(tmp_path):
    """yaml.dump anchors a list or mapping object met twice; a config that repeats one through interpolations must
    still be written out in full, or the reader would refuse alignlm's own checkpoints."""
    from alignlm.models.io import read_config_yaml

    shared = {"shared": [1, {"k": 2.5e-5}], "copies": {"a": "${shared}", "b": "${shared}"}}
    cfg = OmegaConf.create({**OmegaConf.to_container(compose()), **shared})
    (tmp_path / "config.yaml").write_text(config_yaml(cfg))
    back = read_config_yaml(tmp_path / "config.yaml")  # refuses any anchor
    assert OmegaConf.to_container(back, resolve=True) == OmegaConf.to_container(cfg, resolve=True)


def test_a_vision_tower_or_dual_encoder_folder_naming_a_hub_kernel_is_refused(tmp_path, kernel_fetches):
    """The same rule for a tower's folder (model.vision.name_or_path) and a dual encoder's (ReVision, WCA): its
    config.json fetched the kernel when the tower was built."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    from alignlm.models.encoders import HFDualEncoder
    from alignlm.models.vision import HFVisionTower

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    tower = tmp_path / "tower"
    CLIPVisionModel(CLIPVisionConfig(**small, image_size=32, patch_size=16)).save_pretrained(tower)
    dual = tmp_path / "dual"
    CLIPModel(
        CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 16})
    ).save_pretrained(dual)
    for folder, build in (
        (tower, lambda f: HFVisionTower(name_or_path=str(f))),
        (dual, lambda f: HFDualEncoder(str(f))),
    ):
        _set_attention(folder, "", KERNEL)
        with pytest.raises(ConfigError, match=f"{folder}/config.json: attn_implementation='{KERNEL}' names a Hub"):
            build(folder)
    assert kernel_fetches == []


def _poison(folder: Path, value: float) -> None:
    """One weight of the folder's ``model.safetensors`` set to ``value`` in place."""
    weights = load_file(folder / "model.safetensors")
    name = sorted(k for k, v in weights.items() if v.is_floating_point())[0]
    weights[name].view(-1)[0] = value
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_llm_tower_or_dual_encoder_folder_holding_non_finite_weights_is_refused_naming_it(tmp_path, value):
    """A NaN in a frozen LLM's folder loaded, and ``alignlm eval`` reported 0 % accuracy with exit status 0 (training
    from it blamed the learning rate): every folder a part is loaded from is checked as ``final/`` weights are."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    from alignlm.models.encoders import HFDualEncoder
    from alignlm.models.llm import pretrained, tiny
    from alignlm.models.vision import HFVisionTower

    llm, tok = tiny()
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    CLIPVisionModel(CLIPVisionConfig(**small, image_size=32, patch_size=16)).save_pretrained(tmp_path / "tower")
    CLIPModel(
        CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 16})
    ).save_pretrained(tmp_path / "dual")
    held = "NaN" if value != value else "inf"
    for name, build in (
        ("llm", pretrained),
        ("tower", lambda f: HFVisionTower(name_or_path=f)),
        ("dual", HFDualEncoder),
    ):
        folder = tmp_path / name
        _poison(folder, value)
        with pytest.raises(ValueError, match=rf"weights hold {held}: \[.*\] \(1 tensors of {re.escape(str(folder))}\)"):
            build(str(folder))


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_the_finite_test_finds_one_nan_or_infinity_of_either_sign_in_every_dtype(dtype):
    from alignlm.models.loading import finite

    assert finite(torch.randn(64, 8).to(dtype)) and finite(torch.zeros(0, 8, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        if dtype == torch.float8_e4m3fn and bad in (float("inf"), float("-inf")):  # none there: it saturates
            continue
        weights = torch.randn(64, 8).to(dtype)
        weights[37, 5] = bad
        assert not finite(weights), (dtype, bad)


def test_the_finite_test_reads_complex_tensors_by_their_parts_and_integer_ones_as_finite():
    """A trainable complex parameter (a plug-in's learned filter) had made the check before each checkpoint raise
    NotImplementedError, after training, where it names a non-finite parameter."""
    from alignlm.models.loading import finite
    from alignlm.training.sharding import nonfinite_trainable

    spectrum = torch.randn(16, 4, dtype=torch.complex64)
    assert finite(spectrum) and finite(torch.zeros(8, dtype=torch.uint32)) and finite(torch.ones(3, dtype=torch.bool))
    for bad in (complex(float("nan"), 0), complex(0, float("inf"))):
        poisoned = spectrum.clone()
        poisoned[3, 1] = bad
        assert not finite(poisoned), bad
        assert not finite(poisoned.conj())  # a conjugate view, which view_as_real refuses unresolved
    module = torch.nn.Module()
    module.filter = torch.nn.Parameter(spectrum.clone())
    assert nonfinite_trainable(module) == []
    with torch.no_grad():
        module.filter[0, 0] = complex(float("nan"), 1)
    assert nonfinite_trainable(module) == ["filter"]
