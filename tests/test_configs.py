"""Every config composes: each recipe in configs/exp, each option of each config group, with every ``_target_`` naming
something importable; the cheap ones (tiny or offline parts) are built too. A config that only fails when someone
finally picks it shows up here instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from hydra._internal.utils import _locate
from omegaconf import OmegaConf

from alignlm.config import config_dir, instantiate
from alignlm.models.build import build_model
from alignlm.objectives.base import Objective
from alignlm.training.stages import apply_stage
from tests.conftest import compose

CONFIGS = config_dir()
EXPS = sorted(p.stem for p in (CONFIGS / "exp").glob("*.yaml"))
GROUPS = {  # config group -> its options, read from the tree
    group: sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    for group in ("model", "model/vision", "model/llm", "model/connector", "model/align_levels", "stage", "objective")
}
OPTIONS = [(group, option) for group, options in GROUPS.items() for option in options]
# parts that need weights from a hub or a fitted encoder: composed and located, not built
NOT_BUILT = {("model", "demo"), ("model", "llava_hf"), ("model/vision", "dual_encoder")}
NOT_BUILT |= {("model/vision", o) for o in GROUPS["model/vision"] if o not in ("tiny", "efficientnet_lite0")}
NOT_BUILT |= {("model/llm", o) for o in GROUPS["model/llm"] if o != "tiny"}


def targets(node, key: str = "") -> list[tuple[str, str]]:
    """``(config key, _target_)`` of every node of a config (plain containers, interpolations left as written)."""
    if isinstance(node, dict):
        found = [(key, node["_target_"])] if "_target_" in node else []
        return found + [t for k, v in node.items() for t in targets(v, f"{key}.{k}" if key else str(k))]
    if isinstance(node, list):
        return [t for i, item in enumerate(node) for t in targets(item, f"{key}[{i}]")]
    return []


def assert_targets_resolve(cfg) -> None:
    for key, target in targets(OmegaConf.to_container(cfg, resolve=False)):
        assert callable(_locate(target)), f"{key}._target_={target} is not importable"


def test_the_groups_are_read_from_the_tree():
    assert {"tiny", "demo"} <= set(GROUPS["model"]) and "moe" in GROUPS["model/connector"] and "demo" in EXPS


@pytest.mark.parametrize("exp", EXPS)
def test_every_recipe_composes_and_its_targets_resolve(exp):
    cfg = compose(f"+exp={exp}")
    OmegaConf.resolve(cfg)  # every interpolation has a value
    assert set(cfg.run) <= set(cfg.stages)
    assert_targets_resolve(cfg)


@pytest.mark.parametrize("exp", EXPS)
def test_every_recipe_builds_with_tiny_parts_and_its_stages_apply(exp, tiny_clip):
    overrides = [f"+exp={exp}", "model=tiny"]
    if exp == "revision":  # its tower reads a dual encoder: the tiny CLIP of the fixture stands in
        overrides = [f"+exp={exp}", "model/llm=tiny", f"revision.encoder={tiny_clip}", "model.vision.num_tokens=4"]
    cfg = compose(*overrides)
    model = build_model(cfg.model)
    for name in cfg.run:
        stage = cfg.stages[name]
        apply_stage(model, stage.parts, None)  # every part mode the recipe names exists on the model
        for key, node in stage.objectives.items():
            if node is None:  # switched off (the dpo stage's inherited LM loss)
                continue
            node = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "weight"}
            assert isinstance(instantiate(node, f"stages.{name}.objectives.{key}"), Objective)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_the_cheap_ones_build(group, option):
    override = f"+{group}={option}" if group in ("model/align_levels", "objective", "stage") else f"{group}={option}"
    if group in ("objective", "stage"):
        override = f"+{group}@probe={option}"  # packaged under a scratch key, as the recipes place them
    cfg = compose(override)
    assert_targets_resolve(cfg)
    if (group, option) in NOT_BUILT or group == "stage":
        return
    if group == "objective":
        node = {k: v for k, v in OmegaConf.to_container(cfg.probe, resolve=True).items() if k != "weight"}
        assert isinstance(instantiate(node, f"objective {option}"), Objective)
        return
    model = build_model(cfg.model)
    assert model.num_image_tokens > 0 and len(model.tokenizer) <= model.llm.get_input_embeddings().num_embeddings


def test_eval_defaults_and_accelerate_configs_load():
    eval_cfg = OmegaConf.load(CONFIGS / "eval" / "default.yaml")
    assert eval_cfg.probe.metrics and eval_cfg.device == "auto"
    for path in sorted((CONFIGS / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        assert config.num_processes >= 1, path


def test_configs_live_where_the_tree_says():
    assert (CONFIGS / "train.yaml").exists() and Path(CONFIGS).name == "configs"
