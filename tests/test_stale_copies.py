"""Copies that must not outlive what they copy: SIMA's preference records and the rendering config that made them,
a method's copy of the LLM's input embedding table and a stage that trains the table, the feature cache's rows and
their images once the project moved."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from alignlm.checks import check_stages_fit_model
from alignlm.config import ConfigError
from alignlm.data.feature_cache import FeatureCache, file_stamp
from alignlm.methods.sima import generate
from alignlm.methods.sima.generate import prepare_preferences
from alignlm.models.build import build_model
from alignlm.pipeline import run
from tests.conftest import compose, tiny_overrides, write_colour_set
from tests.test_sima import stub_sima  # noqa: F401 - the SIMA tests' stub, a fixture of this module too

# ---- SIMA: the records' knobs hold the rendering config each generation pass is keyed on


@pytest.fixture
def sima_step(request, tmp_path):
    """SIMA's prepare step on a three-record set with the model's work stubbed out (``stub_sima``); returns
    ``prepare(data, **knobs)`` and the list of checkpoints loaded (one per step that generated anything)."""
    loaded = request.getfixturevalue("stub_sima")
    instruct = write_colour_set(tmp_path / "colours", n=3)["instruct"]
    final = tmp_path / "finetune" / "final"
    final.mkdir(parents=True)
    (final / "config.yaml").write_text("model: {}")
    (final / "model.safetensors").write_text("the model")

    def prepare(data: dict, **knobs) -> None:
        sets = [{"name": "colours", "path": str(instruct)}]
        prepare_preferences(str(final), sets, str(tmp_path / "sima"), data, **knobs)

    return prepare, loaded


PAD = {"template": "chat", "image_aspect_ratio": "pad", "num_workers": 0}


def test_sima_records_made_from_padded_images_are_refused_for_a_step_that_crops_them(sima_step):
    """The records' knobs held the template alone, while each generation pass's key held the whole rendering
    config: records the model made from padded images were kept for a step whose data crops them, and the model
    was never loaded (review r3). Another way of making images square is another variant: refused, naming it."""
    prepare, loaded = sima_step
    prepare(PAD)
    with pytest.raises(ValueError, match="written with image_aspect_ratio='pad', but the sima step asks for image_aspect_ratio='crop'"):  # fmt: skip
        prepare({**PAD, "image_aspect_ratio": "crop"})
    assert len(loaded) == 1


def test_sima_keeps_its_records_when_only_how_a_stage_loads_its_data_changes(sima_step, tmp_path):
    """Data keys that answering never reads (loader workers, packing, preference pairs, length limits that stop the
    step rather than change a prompt) are neither knobs nor part of a pass's key: the records stay current. A
    config that leaves image_aspect_ratio out means its default, pad."""
    prepare, loaded = sima_step
    prepare(PAD)
    loading = {"num_workers": 4, "packing": True, "preference": True, "max_length": 64, "feature_cache": True}
    prepare({"template": "chat", **loading})
    assert len(loaded) == 1
    kept = json.loads((tmp_path / "sima" / "colours.run0.json").read_text())["key"]["data"]
    assert kept == {"template": "chat", "template_args": {}, "image_aspect_ratio": "pad"}


def test_sima_records_that_do_not_record_their_rendering_are_generated_again(sima_step, tmp_path, caplog):
    """Records written before the rendering config was a knob say nothing of how their images were made square: they
    are generated again with a warning naming it, as a file that records none of its inputs is (not refused: no
    knob of theirs differs; not kept: they may be the cropped images' answers)."""
    prepare, loaded = sima_step
    prepare(PAD)
    made_from = tmp_path / "sima" / "colours.provenance.json"
    old = json.loads(made_from.read_text())
    del old["provenance"]["knobs"]["image_aspect_ratio"]
    made_from.write_text(json.dumps(old))
    prepare(PAD)
    assert len(loaded) == 2 and "do not record the image_aspect_ratio they were made with" in caplog.text
    prepare(PAD)
    assert len(loaded) == 2  # current again


def test_every_data_key_of_the_sima_recipe_is_rendering_or_listed_as_leaving_the_answers_alone():
    """A data key answering reads must be a knob of the records; one it never reads must not refuse them. The dpo
    stage's data config holds every data key: a new one shows up here until it is classified (``_NOT_RENDERING``)."""
    data = OmegaConf.to_container(compose("+exp=sima").stages.dpo.data, resolve=True)
    assert set(generate.rendering(data)) == {"template", "template_args", "image_aspect_ratio"}


# ---- a copy of the LLM's input embedding table and a stage that trains the table


def test_v2l_with_a_stage_that_trains_the_llm_is_refused_before_any_stage_trains(colour_set, tmp_path):
    """The v2l codebook is the embedding table as built; the default finetune (parts.llm=full) trained the table and
    left every visual token the word of the table as it was (review r7). Refused before pretraining starts, naming
    the stage's key, the copy and the remedy."""
    cfg = compose(*tiny_overrides(colour_set, tmp_path, "model/connector=v2l", "eval.sets=[]"))
    with pytest.raises(ConfigError) as refused:
        run(cfg)
    message = str(refused.value)
    assert "stages.finetune.parts.llm=full trains the LLM's input embedding table" in message
    assert "model.connector holds its codebook" in message and "stages.finetune.parts.llm=frozen" in message
    assert not (tmp_path / "t" / "pretrain" / "final").exists()


def test_a_stage_that_leaves_the_embedding_table_alone_keeps_its_copies():
    """The v2l recipe (the LLM frozen in both stages) and LoRA on all-linear (no embedding adapted) pass; LoRA that
    adapts the embedding table is refused, naming target_modules."""
    recipe = compose("model=tiny", "+exp=v2l")
    model = build_model(recipe.model)
    check_stages_fit_model(recipe, ["pretrain", "finetune"], model)
    lora = compose("model=tiny", "model/connector=v2l", "stages.finetune.parts.llm=lora")
    check_stages_fit_model(lora, ["pretrain", "finetune"], model)
    embeddings = compose(
        "model=tiny", "model/connector=v2l", "stages.finetune.parts.llm=lora", "stages.finetune.lora.target_modules=[embed_tokens]"
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"stages.finetune.lora.target_modules adapts the LLM's input embedding table \(model.embed_tokens\), but model.connector"):  # fmt: skip
        check_stages_fit_model(embeddings, ["finetune"], model)


def test_sea_in_a_stage_that_trains_the_llm_is_refused_naming_the_objective():
    """SEA's label-word embeddings are the table's rows taken when its stage starts: a stage of SEA that trains the
    table pulled the visual tokens towards words the LLM no longer has. The same stage without SEA trains."""
    sea = compose("model=tiny", "+objective@stages.finetune.objectives.sea=sea")
    model = build_model(sea.model)
    with pytest.raises(ConfigError, match="stages.finetune.parts.llm=full .* but stages.finetune.objectives.sea holds its label words' embeddings"):  # fmt: skip
        check_stages_fit_model(sea, ["pretrain", "finetune"], model)
    check_stages_fit_model(compose("model=tiny"), ["pretrain", "finetune"], model)
    frozen = compose("model=tiny", "+objective@stages.finetune.objectives.sea=sea", "stages.finetune.parts.llm=frozen")
    check_stages_fit_model(frozen, ["pretrain", "finetune"], model)


# ---- the feature cache: a moved project hits, other images never do


def images(root: Path, names: list[str], payload: bytes = b"x" * 64) -> list[Path]:
    """Image files (only their stamps are read here) under ``root``, all with one modification time."""
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
        paths.append(path)
    return paths


def fill(folder: Path, paths: list[Path]) -> torch.Tensor:
    """One shard of made-up features for ``paths`` in the cache ``folder``."""
    features = torch.arange(len(paths) * 6, dtype=torch.float32).reshape(len(paths), 2, 3)
    FeatureCache(folder).write("shard", paths, [file_stamp(p) for p in paths], features)
    return features


NAMES = ["images/a.png", "images/sub/b.png"]


def test_a_project_moved_with_its_feature_cache_still_hits(tmp_path):
    """The cache keyed each image by its resolved path: a project moved or mounted elsewhere (data and outputs)
    computed every image again, GPU-hours at 558k images (review r4). Now its rows serve the images where they are."""
    features = fill(tmp_path / "a" / "outputs" / "cache", images(tmp_path / "a" / "data", NAMES))
    shutil.move(tmp_path / "a", tmp_path / "b")
    cache = FeatureCache(tmp_path / "b" / "outputs" / "cache")
    moved = [tmp_path / "b" / "data" / n for n in NAMES]
    survey = cache.survey(moved)
    assert not survey.missing and set(survey.found) == set(moved)
    assert torch.equal(cache.get(moved), features)


def test_a_cache_moved_away_from_images_that_stayed_still_hits_them(tmp_path):
    paths = images(tmp_path / "data", NAMES)
    features = fill(tmp_path / "a" / "cache", paths)
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert torch.equal(FeatureCache(tmp_path / "b" / "cache").get(paths), features)


def test_images_of_the_same_names_stamps_and_sizes_under_another_root_never_share_features(tmp_path):
    """Two sources with the same names under other roots, their files of one size and time but other bytes: the
    features of one never serve the other, when both are there, when the cache was copied beside the other, or moved
    beside it while its own images stayed."""
    own = images(tmp_path / "one" / "data", NAMES, b"o" * 64)
    other = images(tmp_path / "two" / "data", NAMES, b"t" * 64)
    assert [file_stamp(p) for p in own] == [file_stamp(p) for p in other]
    fill(tmp_path / "one" / "outputs" / "cache", own)
    assert set(FeatureCache(tmp_path / "one" / "outputs" / "cache").survey(other).missing) == set(other)
    shutil.copytree(tmp_path / "one" / "outputs", tmp_path / "two" / "outputs")
    assert set(FeatureCache(tmp_path / "two" / "outputs" / "cache").survey(other).missing) == set(other)
    shutil.rmtree(tmp_path / "two" / "outputs")
    shutil.move(tmp_path / "one" / "outputs", tmp_path / "two" / "outputs")
    cache = FeatureCache(tmp_path / "two" / "outputs" / "cache")
    assert set(cache.survey(other).missing) == set(other) and not cache.survey(own).missing


def test_a_cache_written_before_shards_recorded_their_folder_still_serves_in_place_and_misses_once_moved(tmp_path):
    """A shard without ``folder`` serves the paths it names, as it always did; moved, its images are computed again
    once (no crash), and the new shards record where they were written."""
    paths = images(tmp_path / "a" / "data", NAMES)
    fill(tmp_path / "a" / "cache", paths)
    (shard,) = (tmp_path / "a" / "cache").glob("*.safetensors")
    with safe_open(str(shard), "pt") as f:
        meta, features = f.metadata(), f.get_tensor("features")
    assert meta.pop("folder") == str((tmp_path / "a" / "cache").resolve())
    save_file({"features": features}, str(shard), metadata=meta)
    assert not FeatureCache(tmp_path / "a" / "cache").survey(paths).missing
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = [tmp_path / "b" / "data" / n for n in NAMES]
    assert set(FeatureCache(tmp_path / "b" / "cache").survey(moved).missing) == set(moved)
