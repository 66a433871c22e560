"""A trained part's parameters all get a gradient: the property DDP needs (its default find_unused_parameters=False).

A tower keeps every weight, but the features read from ``select_layer: -2`` never pass through the last layer nor
the norm / pooling head after it; with ``stages.<s>.parts.vision=full`` (or ``lora``) those weights trained, got no
gradient, and 2 DDP ranks failed at step 2 ("Expected to have finished reduction in the prior iteration"), while ZeRO
weight-decayed them where AdamW did not. They now stay frozen, and in the model.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alignlm.models.build import build_model
from alignlm.models.io import part_state
from alignlm.models.vision import EfficientNetLiteTower
from alignlm.training.stages import apply_stage, param_groups
from tests.conftest import compose, make_batch, tiny_overrides

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
TOWERS = {
    "clip": [],
    "siglip": ["model.vision.config.model_type=siglip_vision_model"],
    "dinov2_registers": [
        "model.vision.config.model_type=dinov2_with_registers",
        "+model.vision.config.num_register_tokens=4",
    ],
}
# what the selected features never pass through, beside the layers above select_layer (the tiny towers have 2)
HEADS = {
    "clip": ["post_layernorm."],  # applied to the pooled CLS only
    "siglip": ["post_layernorm.", "head."],  # the last hidden state's norm, then attention pooling
    "dinov2_registers": ["layernorm.", "embeddings.mask_token"],  # the last hidden state's norm; masked pretraining
}
LAYERS = {"clip": "encoder.layers.", "siglip": "encoder.layers.", "dinov2_registers": "encoder.layer."}


def _tiny(tower: str, *extra: str):
    return build_model(compose("model=tiny", *TOWERS[tower], *extra).model)


def _lm_backward(model) -> None:
    model(make_batch(model, [1, 2, 0])).lm_loss.backward()


def _without_grad(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def _expected_inert(model, tower: str, select_layer: int) -> set[str]:
    """The tower's parameter names that ``select_layer`` of its 2 layers and the head leave unused."""
    above = [f"{LAYERS[tower]}{i}." for i in range(2 + select_layer + 1, 2)]
    unused = tuple(f"model.{prefix}" for prefix in [*above, *HEADS[tower]])
    return {n for n, _ in model.vision.named_parameters() if n.startswith(unused)}


@pytest.mark.parametrize("tower", list(TOWERS))
@pytest.mark.parametrize("select_layer", [-2, -1])
def test_the_tower_declares_exactly_the_parameters_its_features_never_reach(tower, select_layer):
    model = _tiny(tower, f"model.vision.select_layer={select_layer}")
    inert = set(model.vision.inert_parameters())
    assert inert == _expected_inert(model, tower, select_layer)
    _lm_backward(model)  # every parameter trains at build: the ones without a gradient are exactly the inert ones
    assert {n.removeprefix("vision.") for n in _without_grad(model) if n.startswith("vision.")} == inert


@pytest.mark.parametrize("tower", list(TOWERS))
def test_a_fully_trained_tower_has_a_gradient_for_every_trainable_parameter(tower):
    """parts.vision=full: the inert weights stay frozen, out of the optimizer (no decay), and in ``final/``."""
    model = _tiny(tower)
    apply_stage(model, {"vision": "full", "connector": "full", "llm": "full"})
    _lm_backward(model)
    assert _without_grad(model) == []
    inert = model.vision.inert_parameters()
    trainable = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert trainable and trainable.isdisjoint(inert)
    assert set(inert) | trainable == {n for n, _ in model.vision.named_parameters()}
    groups = param_groups(model, {"vision": 1e-4, "connector": 1e-3, "llm": 1e-4}, weight_decay=0.1)
    optimised = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in optimised for n, p in model.vision.named_parameters() if n in inert)
    assert {f"vision.{n}" for n in inert} <= set(part_state(model, ["vision"]))


@pytest.mark.parametrize("tower", list(TOWERS))
def test_a_lora_tower_puts_no_adapter_where_the_features_never_pass(tower):
    """parts.vision=lora with target_modules all-linear: adapters in the last layer or the head got no gradient."""
    model = _tiny(tower)
    apply_stage(model, {"vision": "lora", "connector": "full", "llm": "lora"}, LORA)
    _lm_backward(model)
    assert _without_grad(model) == []
    adapted = [n for n, p in model.vision.named_parameters() if p.requires_grad]
    assert adapted and all(".lora_" in n for n in adapted)
    assert any(f"{LAYERS[tower]}0." in n for n in adapted)  # the layers the features pass through are adapted


def test_a_cnn_towers_classifier_is_inert():
    """EfficientNet's ImageNet classifier ``_fc`` sits after the feature map the tokens come from; the probe image
    runs in eval mode, so a training tower's BatchNorm statistics never see it."""
    tower = EfficientNetLiteTower(image_size=64, weights=None).train()
    statistics = {k: v.clone() for k, v in tower.state_dict().items() if "running_" in k}
    assert tower.inert_parameters() == ["model._fc.weight", "model._fc.bias"]
    assert tower.training and all(torch.equal(v, tower.state_dict()[k]) for k, v in statistics.items())


def test_declaring_the_inert_parameters_leaves_a_frozen_tower_as_it_was():
    """The probe leaves every parameter's requires_grad and every module's mode as they were: a frozen tower stays
    frozen, and nothing of it is left trainable."""
    model = _tiny("clip")
    apply_stage(model, {"connector": "full"})
    model.vision.model.encoder.layers[0].train()
    modes = [m.training for m in model.vision.modules()]
    assert model.vision.inert_parameters()
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert [m.training for m in model.vision.modules()] == modes


def test_two_ddp_ranks_train_a_full_tower(colour_set, tmp_path):
    """2 gloo ranks with parts.vision=full failed at step 2; now they train, and the tower's ``final/`` weights keep
    every tensor, the inert ones as they started."""
    from tests.test_cluster import torchrun

    job = tiny_overrides(
        colour_set,
        tmp_path,
        "run=[pretrain]",
        "offline_datasets=[]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=2",
        "stages.pretrain.per_device_batch_size=2",
        "stages.pretrain.save_every=0",
        "stages.pretrain.parts={vision:full,connector:full,llm:frozen}",
    )
    proc = torchrun(job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = load_file(str(tmp_path / "t" / "pretrain" / "final" / "model.safetensors"))
    start = _tiny("clip")
    inert = start.vision.inert_parameters()
    assert {f"vision.{n}" for n in inert} <= set(final)
    assert all(torch.equal(final[f"vision.{n}"], p) for n, p in start.vision.named_parameters() if n in inert)
    assert not torch.equal(
        final["vision.model.encoder.layers.0.mlp.fc1.weight"], start.vision.model.encoder.layers[0].mlp.fc1.weight
    )
