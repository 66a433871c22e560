"""A trained part's parameters all get a gradient: the property DDP needs (its default find_unused_parameters=False).

A tower keeps every weight, but the features read from ``select_layer: -2`` never pass through the last layer nor
the norm / pooling head after it; with ``stages.<s>.parts.vision=full`` (or ``lora``) those weights trained, got no
gradient, and 2 DDP ranks failed at step 2 ("Expected to have finished reduction in the prior iteration"), while ZeRO
weight-decayed them where AdamW did not. They now stay frozen, and in the model.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from alignlm.checks import check_stages_fit_model
from alignlm.config import ConfigError
from alignlm.evaluation.checkpoints import load, resolve
from alignlm.models.build import build_model
from alignlm.models.io import config_yaml, part_state
from alignlm.models.vision import EfficientNetLiteTower
from alignlm.pipeline import run
from alignlm.training.checkpoint import layout, resume_changes
from alignlm.training.stages import apply_stage, merge_lora, param_groups
from tests.conftest import RANKS, compose, make_batch, tiny_overrides, write_colour_set

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
TOWERS = {
    "clip": [],
    "siglip": ["model.vision.config.model_type=siglip_vision_model"],
    "dinov2_registers": [
        "model.vision.config.model_type=dinov2_with_registers",
        "+model.vision.config.num_register_tokens=4",
        "~model.vision.config.intermediate_size",  # DINOv2 sizes its MLP by mlp_ratio
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


@RANKS
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


def _as_alignlm_trained_before(model, parts: dict[str, str]) -> None:
    """The stage's parts set up as alignlm did before it kept a tower's inert weights frozen: a fully trained part
    trained every weight, and LoRA adapted every linear layer."""
    for part in model.PARTS:
        module = getattr(model, part)
        module.requires_grad_(parts.get(part, "frozen") == "full")
        if parts.get(part) == "lora":
            config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear")
            setattr(model, part, get_peft_model(module, config))


def _old_step_checkpoint(colour_set, tmp_path, vision: str):
    """A step checkpoint of a stage training the tiny tower (``vision``: full or lora) as an alignlm from before wrote
    it: every trainable tensor (the inert ones and their adapters too) moved away from its start, as training does,
    and the layout of its trainer state. Returns its folder, its stage's config and the model as it trained."""
    parts = {"vision": vision, "connector": "full", "llm": "frozen"}
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path, "run=[pretrain]", f"stages.pretrain.parts.vision={vision}"),
        "stages.pretrain.lora={r:2,alpha:4,dropout:0.0,target_modules:all-linear}",
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    _as_alignlm_trained_before(model, parts)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    stage_dir = tmp_path / "t" / "pretrain"
    folder = stage_dir / "checkpoints" / "step_000002"
    folder.mkdir(parents=True)
    (stage_dir / "config.yaml").write_text(config_yaml(cfg))
    save_file(part_state(model, model.PARTS, only_trainable=True), str(folder / "trainable.safetensors"))
    state = {"step": 2, "stage": "pretrain", "layout": layout(model, None)}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder, cfg, model


@pytest.mark.parametrize("vision", ["lora", "full"])
def test_a_step_checkpoint_that_trained_the_inert_weights_evaluates_and_its_resume_says_why_not(
    colour_set, tmp_path, vision
):
    """A step checkpoint written before the inert weights stayed frozen: its evaluation had failed ("checkpoint has
    weights the model lacks": adapters on the layer above select_layer) and its resume called it one of another
    model, asking what the user had changed. Now the evaluation leaves those tensors out, saying so, and computes
    what the checkpoint's model computed; the resume says why it cannot go on and what to do."""
    folder, cfg, trained = _old_step_checkpoint(colour_set, tmp_path, vision)
    logger = logging.getLogger("alignlm")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        torch.manual_seed(0)  # its frozen weights as the trained model's
        (ck,) = resolve([str(folder)])
        model = load(ck)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    said = [r.getMessage() for r in records if "never depends on" in r.getMessage()]
    assert len(said) == 1 and "encoder.layers.1." in said[0] and str(folder) in said[0]
    merge_lora(trained)
    torch.manual_seed(0)
    ours = build_model(cfg.model)  # as the stage started
    images = torch.rand(2, 3, *[model.vision.image_spec.size] * 2)
    with torch.no_grad():
        torch.testing.assert_close(model.vision(images), trained.vision(images))
        assert not torch.allclose(model.vision(images), ours.vision(images))  # the step's weights loaded
    inert = apply_stage(ours, cfg.stages.pretrain.parts, cfg.stages.pretrain.lora)
    written = json.loads((folder / "trainer_state.json").read_text())
    run_state = {"world": 1, "strategy": "ddp", "recipe": {}, "layout": layout(ours, None)}
    for allow in (False, True):  # resume_allow_changes does not help
        with pytest.raises(ValueError, match="from before a tower's inert weights") as refused:
            resume_changes(folder, written, run_state, "pretrain", allow, inert)
    assert "resume=never" in str(refused.value) and "encoder.layers.1." in str(refused.value)
    other = run_state | {"layout": {**run_state["layout"], "connector.extra.weight": [2, 2]}}
    with pytest.raises(ValueError, match="does not fit this run's model"):  # another difference: the message as was
        resume_changes(folder, written, other, "pretrain", False, inert)


def test_a_lora_tower_whose_only_linear_layer_is_inert_is_refused_before_anything_trains(tmp_path):
    """EfficientNet-Lite's one linear layer is its classifier ``_fc``, which the features never reach: with
    parts.vision=lora peft found nothing to adapt when the finetune stage began, after pretraining had trained (before
    the inert weights stayed out of LoRA, it trained an adapter there that changed nothing)."""
    sets = write_colour_set(tmp_path / "data", n=8)
    overrides = tiny_overrides(
        sets,
        tmp_path / "out",
        "model/vision=efficientnet_lite0",
        "model.vision.weights=null",
        "stages.pretrain.max_steps=1",
        "stages.finetune.max_steps=1",
        "eval.sets=[]",
        "stages.finetune.parts.vision=lora",
    )
    with pytest.raises(ConfigError, match=r"stages\.finetune\.parts\.vision=lora adapts nothing") as refused:
        run(compose(*overrides))
    assert "no linear layer of model.vision reaches its features" in str(refused.value)
    assert "stages.finetune.parts.vision=full or frozen" in str(refused.value)
    assert not any((tmp_path / "out").rglob("*.safetensors"))  # pretraining never began


def test_lora_targets_that_name_only_inert_layers_are_refused_before_anything_trains(colour_set, tmp_path):
    """Explicit ``target_modules`` that match only the tower's layer above ``select_layer`` adapt nothing that
    trains."""
    cfg = compose(*tiny_overrides(colour_set, tmp_path, "stages.finetune.parts.vision=lora"))
    cfg.stages.finetune.lora.target_modules = r"model\.encoder\.layers\.1\..*_proj"  # a pattern: peft's fullmatch
    with pytest.raises(ConfigError, match=r"stages\.finetune\.parts\.vision=lora adapts nothing") as refused:
        check_stages_fit_model(cfg, ["pretrain", "finetune"], build_model(cfg.model))
    assert "layers.1" in str(refused.value) and "target layers its features pass through" in str(refused.value)
    reaching = compose(
        *tiny_overrides(colour_set, tmp_path, "stages.finetune.parts.vision=lora"),
        "stages.finetune.lora.target_modules=[q_proj,v_proj]",
    )
    check_stages_fit_model(reaching, ["pretrain", "finetune"], build_model(reaching.model))
