"""Behaviour the method parts and the evaluation tools keep: step checkpoints of a stage that freezes an inherited part,
AlignGPT level scoring, provenance and hook checks, the V2L connector's codebook, losses and metrics, generation seeds
and prompt limits, caption metrics, exports, and the geometry suite."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignlm.commands import main
from alignlm.data.build import build_dataset
from alignlm.data.records import DataError
from alignlm.evaluation import export_check
from alignlm.evaluation.captions import bleu, cider_d
from alignlm.evaluation.checkpoints import load, resolve
from alignlm.evaluation.lmms import write_local_task
from alignlm.geometry import metrics as M
from alignlm.geometry.suite import pair_metrics
from alignlm.methods.aligngpt.levels import LevelLabels, caption_pairs, ensure_levels, make_levels, pair_scores
from alignlm.methods.revision.embed import embed_items
from alignlm.methods.revision.shards import list_shards
from alignlm.methods.revision.tower import DualEncoderTower
from alignlm.methods.v2l.connector import V2LConnector
from alignlm.models.build import build_model
from alignlm.models.encoders import HFDualEncoder
from alignlm.models.generation import (
    batch_seed,
    check_prompt_lengths,
    generate_set,
    generation_dataset,
    prompt_length,
)
from alignlm.models.io import load_model
from alignlm.pipeline import run
from alignlm.training.stages import apply_stage
from alignlm.training.trainer import sample_relations
from tests.conftest import compose, tiny_overrides
from tests.test_aligngpt import WITH_LEVELS, ColourEncoder


@pytest.fixture
def v2l_model():
    return build_model(compose("model=tiny", "model/connector=v2l").model)


# ---- step checkpoints ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frozen_connector_run(colour_set, tmp_path_factory) -> Path:
    """A tiny two-stage run whose finetune stage freezes the connector it inherits: pretrain 2 steps, finetune 3 with
    a step checkpoint at step 2."""
    out = tmp_path_factory.mktemp("frozen_connector")
    run(
        compose(
            *tiny_overrides(
                colour_set,
                out,
                "stages.pretrain.max_steps=2",
                "stages.finetune.max_steps=3",
                "stages.finetune.parts.connector=frozen",
                "stages.finetune.keep_last=0",
            )
        )
    )
    return out / "t"


def test_a_step_checkpoint_of_a_stage_freezing_an_inherited_part_is_evaluated_with_that_part(frozen_connector_run):
    """A finetune stage that freezes the connector it inherits from pretraining saves no connector in its step
    checkpoints; evaluating one must load pretraining's connector, not a freshly initialised one."""
    (ck,) = resolve([str(frozen_connector_run / "finetune" / "checkpoints" / "step_000002")])
    stepped = load(ck)
    pretrained = load_model(frozen_connector_run / "pretrain" / "final")
    fresh = build_model(compose("model=tiny").model)
    for (name, got), want in zip(stepped.connector.state_dict().items(), pretrained.connector.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"connector {name}")
    assert any(not torch.equal(a, b) for a, b in zip(pretrained.connector.parameters(), fresh.connector.parameters()))


def test_a_run_folder_lists_its_stages_in_training_order(frozen_connector_run):
    """Evaluating a run folder reports its stages' final checkpoints in the order the run trained them (pretrain
    before finetune), not alphabetically, so tables and plots read as a trajectory."""
    assert [(c.stage, c.kind) for c in resolve([str(frozen_connector_run)])] == [
        ("pretrain", "final"),
        ("finetune", "final"),
    ]


# ---- AlignGPT levels -------------------------------------------------------------------------------------------------


def test_an_unreadable_image_in_the_middle_of_a_batch_leaves_the_other_scores_in_place(colour_set, tmp_path):
    """An unreadable image among readable ones gets no score, and each readable pair keeps its own score: shifted
    scores would give records the levels of their neighbours."""
    pairs, _ = caption_pairs([colour_set["pretrain"]])
    paths, captions = [p[1] for p in pairs[:6]], [p[2] for p in pairs[:6]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths[2] = broken
    scores, ok = pair_scores(ColourEncoder(), paths, captions, batch_size=6, num_workers=0)
    assert ok.tolist() == [True, True, False, True, True, True]
    keep = [0, 1, 3, 4, 5]
    alone, ok_alone = pair_scores(
        ColourEncoder(), [paths[i] for i in keep], [captions[i] for i in keep], batch_size=6, num_workers=0
    )
    assert ok_alone.all()
    np.testing.assert_allclose(scores[keep], alone, rtol=0, atol=1e-12)


@pytest.fixture
def mismatched_copy(colour_set, tmp_path) -> tuple[Path, Path]:
    """The colour captions and a copy of their images in a folder of this test's own, so the images may be edited."""
    records = json.loads(colour_set["pretrain"].read_text())[:24]
    images = tmp_path / "images"
    images.mkdir()
    for rec in records:
        name = Path(rec["image"]).name
        (images / name).write_bytes((colour_set["pretrain"].parent / rec["image"]).read_bytes())
        rec["image"] = f"images/{name}"
    data = tmp_path / "pretrain.json"
    data.write_text(json.dumps(records))
    return data, images


def test_the_prepare_step_writes_levels_again_when_an_image_changed(mismatched_copy, tmp_path):
    """Levels scored from images that were since replaced are stale: the prepare step must notice a changed image
    (its size or modification time) and score the pairs again."""
    data, images = mismatched_copy
    out = tmp_path / "levels.json"
    node = {"out": out, "data": [str(data)], "encoder": ColourEncoder(), "num_levels": 4}
    ensure_levels(**node)
    before = json.loads(out.read_text())
    records = json.loads(data.read_text())
    first = images / Path(records[0]["image"]).name
    second = images / Path(records[1]["image"]).name
    first.write_bytes(second.read_bytes())  # another picture under the same name
    stamp = out.stat().st_mtime_ns + 10_000_000_000
    os.utime(first, ns=(stamp, stamp))
    ensure_levels(**node)
    after = json.loads(out.read_text())
    assert after["provenance"]["inputs"]["images"] != before["provenance"]["inputs"]["images"]
    fresh = json.loads(make_levels(tmp_path / "fresh.json", [data], ColourEncoder(), num_levels=4).read_text())
    assert after["levels"] == fresh["levels"]


def test_the_levels_hook_refuses_a_record_without_a_level_when_errors_raise(tiny_model, colour_set, tmp_path):
    """With ``data.on_error=raise`` a levels file that lacks some of the stage's records fails at start-up instead of
    skipping them silently; with ``skip`` it is accepted."""
    model = tiny_model(WITH_LEVELS)
    apply_stage(model, {"connector": "full", "align_levels": "levels"})
    records = json.loads(colour_set["pretrain"].read_text())
    levels = make_levels(tmp_path / "levels.json", [colour_set["pretrain"]], ColourEncoder(), 8)
    meta = json.loads(levels.read_text())
    meta["levels"].pop(str(records[0]["id"]))
    levels.write_text(json.dumps(meta))
    hooks = {"levels": {"_target_": "alignlm.methods.aligngpt.hook.LevelHook", "path": str(levels)}}
    data = {"sources": [{"path": str(colour_set["pretrain"])}], "hooks": hooks}
    build_dataset({**data, "on_error": "skip"}, model, 0)
    with pytest.raises(DataError, match=r"have no level for 1 of the"):
        build_dataset({**data, "on_error": "raise"}, model, 0)


def test_a_level_equal_to_the_number_of_levels_is_refused(colour_set, tmp_path):
    """Levels run from 0 to ``num_levels - 1``: a file holding level ``num_levels`` would index past the level
    embeddings, so opening it fails."""
    levels = make_levels(tmp_path / "levels.json", [colour_set["pretrain"]], ColourEncoder(), 4)
    meta = json.loads(levels.read_text())
    meta["levels"][next(iter(meta["levels"]))] = 4
    levels.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"outside 0\.\.3"):
        LevelLabels(levels)


# ---- V2L -------------------------------------------------------------------------------------------------------------


def test_diversity_of_uniform_assignments_is_zero(v2l_model):
    """Tokens unsure of every word, spread evenly, have equal mean entropy and entropy of the mean: the diversity term
    ``mean H(p) - H(mean p)`` is zero, neither rewarding nor penalising them."""
    conn = v2l_model.connector
    uniform = torch.zeros(8, len(conn.table))
    assert conn._diversity(uniform).item() == pytest.approx(0.0, abs=1e-4)


def test_the_codebook_must_hold_at_least_the_global_tokens(v2l_model):
    """An image's global words are distinct codebook rows: a codebook with fewer rows than ``global_tokens`` cannot
    give them and is refused when the vocabulary is bound."""
    table, tok = v2l_model.llm.get_input_embeddings().weight.detach(), v2l_model.tokenizer
    special = set(tok.all_special_ids)
    rows = next(r for r in range(1, len(tok)) if len([i for i in range(r) if i not in special]) == 3)
    conn = V2LConnector(8, table.shape[1], global_tokens=5, codebook="all")
    with pytest.raises(ValueError, match="too few for a codebook"):
        conn.bind_vocabulary(table[:rows], tok)
    V2LConnector(8, table.shape[1], global_tokens=2, codebook="all").bind_vocabulary(table[:rows], tok)


def test_a_codebook_keeps_only_rows_the_embedding_table_has(v2l_model):
    """A tokenizer may name more ids than the embedding table has rows; the codebook keeps only ids with a row."""
    table, tok = v2l_model.llm.get_input_embeddings().weight.detach(), v2l_model.tokenizer
    conn = V2LConnector(8, table.shape[1], global_tokens=2, codebook="all")
    conn.bind_vocabulary(table[:64], tok)
    assert int(conn.vocab_ids.max()) < 64 and len(conn.table) == len(conn.vocab_ids)


def test_the_v2l_connector_with_losses_relates_the_samples_of_a_micro_batch(v2l_model):
    """Its auxiliary losses are means over the micro-batch's tokens, so the trainer must keep micro-batches as drawn;
    with every loss weight zero its tokens depend on their own image only."""
    assert "model.connector" in sample_relations(v2l_model, {})
    table = v2l_model.llm.get_input_embeddings().weight.detach()
    quiet = V2LConnector(8, table.shape[1], commitment_weight=0, reconstruction_weight=0, diversity_weight=0)
    assert not quiet.relates_samples


def test_codes_used_and_perplexity_count_the_distinct_words_an_image_batch_uses(v2l_model):
    """``v2l_codes_used`` is the number of distinct codebook words the batch's tokens (global and local) picked, and
    the perplexity that of their counts: what tells a user the codes collapsed."""
    conn = v2l_model.connector
    features = torch.randn(2, v2l_model.vision.num_patches, v2l_model.vision.hidden_size)
    out = conn(features)
    ids = conn.words(features).flatten()
    _, counts = ids.unique(return_counts=True)
    share = counts.double() / counts.sum()
    assert out.metrics["v2l_codes_used"].item() == len(counts)
    assert out.metrics["v2l_code_perplexity"].item() == pytest.approx(math.exp(-(share * share.log()).sum()), rel=1e-5)


def test_the_reconstruction_loss_reads_normalised_features_back_from_local_and_global_words(v2l_model):
    """The reconstruction term is the mean of two read-backs of layer-normalised targets: each patch from its word,
    and the image's mean feature from its global words."""
    conn = v2l_model.connector
    features = 3 * torch.randn(2, v2l_model.vision.num_patches, v2l_model.vision.hidden_size) + 1
    with torch.no_grad():
        out = conn(features)
        tokens, g = out.tokens, conn.global_tokens
        local = F.mse_loss(conn.decoder(tokens[:, g:]), F.layer_norm(features, features.shape[-1:]))
        whole = F.layer_norm(features.mean(1, keepdim=True), features.shape[-1:])
        pooled = F.mse_loss(conn.decoder(tokens[:, :g].mean(1, keepdim=True)), whole)
    torch.testing.assert_close(out.metrics["v2l_reconstruction"], (local + pooled) / 2, rtol=1e-5, atol=1e-6)


# ---- generation ------------------------------------------------------------------------------------------------------


def test_each_batch_of_a_set_samples_from_a_stream_of_its_own():
    """Sampled decoding seeds each batch by the set's seed and the batch's first record: two batches of one set must
    not draw the same random numbers."""
    assert batch_seed(0, 0) != batch_seed(0, 16) and batch_seed(3, 16) != batch_seed(3, 32)
    assert batch_seed(3, 16) == batch_seed(3, 16)


def test_a_prompt_exactly_as_long_as_max_length_is_accepted(tiny_model, colour_set):
    """``data.max_length`` is the longest prompt a stage takes: a prompt of exactly that many tokens fits, one token
    less of room is refused before any answer is generated."""
    model = tiny_model()
    path = str(colour_set["test"])
    dataset = generation_dataset(model, path, {"template": "vicuna_v1"})
    length = prompt_length(dataset, *dataset.record(0))
    check_prompt_lengths(model, path, {"template": "vicuna_v1", "max_length": length}, limit=1)
    with pytest.raises(DataError, match="over its stage's data.max_length"):
        check_prompt_lengths(model, path, {"template": "vicuna_v1", "max_length": length - 1}, limit=1)


def test_an_answer_ending_with_eos_at_the_token_limit_is_not_called_cut(tiny_model, colour_set, alignlm_log):
    """An answer whose last allowed token is the end-of-sequence token finished its turn: no warning may call it cut
    by ``max_new_tokens``, which would send the user to raise a limit that cut nothing."""
    model = tiny_model()
    eos = model.tokenizer.eos_token_id
    word = model.tokenizer.convert_tokens_to_ids(model.tokenizer.tokenize(" red"))[0]
    model.generate = lambda inputs, max_new_tokens, stop, **_: torch.tensor([[word] * (max_new_tokens - 1) + [eos]])
    out = generate_set(model, str(colour_set["test"]), {"template": "plain"}, batch_size=1, max_new_tokens=3, limit=2)
    assert len(out) == 2
    assert "reached max_new_tokens" not in alignlm_log.text


# ---- ReVision --------------------------------------------------------------------------------------------------------


def test_no_token_of_the_dual_encoder_tower_describes_a_patch(tiny_clip):
    """Every token of the ReVision tower is the pooled image embedding: all of them count as prefix tokens, so patch
    tools (SEA labels, artifact filters, printed patch grids) never take one for a patch."""
    tower = DualEncoderTower(str(tiny_clip), num_tokens=5)
    assert tower.num_patches == 5 and tower.num_prefix_tokens == 5


def test_a_shard_of_the_same_texts_under_other_ids_is_embedded_again(tmp_path, tiny_clip):
    """Ids reordered or renamed with the texts kept in place: the shard must be rewritten under the new ids, or each
    record would be served another record's embedding."""
    encoder = HFDualEncoder(str(tiny_clip), name="tiny")
    embed_items(encoder, "texts", [("a", "red"), ("b", "blue")], tmp_path, progress=False)
    (path,) = embed_items(encoder, "texts", [("b", "red"), ("a", "blue")], tmp_path, progress=False)
    assert list_shards([path])[0].ids == ["b", "a"]


# ---- caption metrics, lmms-eval tasks, export checks ----------------------------------------------------------------


def test_cider_with_several_identical_references_is_ten_for_a_perfect_caption():
    """CIDEr-D averages over an image's references: a caption equal to each of its references scores 10, however many
    references the image has."""
    hyps = ["a red square here", "two blue circles there", "one green line below"]
    assert cider_d(hyps, [[h, h, h] for h in hyps]) == pytest.approx(10.0)
    assert cider_d(hyps, [[h, h] for h in hyps]) == pytest.approx(cider_d(hyps, [[h] for h in hyps]))


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
    """BLEU penalises a caption shorter than the reference closest to it in length, not the shortest reference: a
    six-word caption matching a seven-word reference is penalised even when another reference has two words."""
    hyp = "a b c d e f"
    assert bleu([hyp], [["a b c d e f g", "x y"]]) == pytest.approx(math.exp(1 - 7 / 6), rel=1e-6)


def test_an_lmms_task_keeps_a_list_of_reference_answers(colour_set, tmp_path):
    """A question with several human answers is scored by VQA accuracy over all of them: the task file must keep the
    list, not only the first answer."""
    record = json.loads(colour_set["test"].read_text())[0]
    (tmp_path / "images").symlink_to(colour_set["test"].parent / "images", target_is_directory=True)
    record["answer"] = ["red", "crimson", "red"]
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([record]))
    task = write_local_task(questions, tmp_path / "tasks", "colours")
    (row,) = [json.loads(line) for line in (task / "colours.jsonl").read_text().splitlines()]
    assert row["answer"] == ["red", "crimson", "red"]


def test_the_export_check_counts_differing_answers_and_scores_each_side_on_its_own(tmp_path, monkeypatch):
    """The check reports how many answers both sides share and each side's accuracy from its own answers: an export
    that answers differently must show it in both numbers."""
    questions = tmp_path / "q.json"
    questions.write_text(
        json.dumps([{"id": f"q{i}", "conversations": [{"from": "human", "value": "?"}]} for i in (0, 1)])
    )
    records = [{"id": "q0", "answer": "red"}, {"id": "q1", "answer": "blue"}]
    monkeypatch.setattr(export_check, "resolve", lambda paths: ["ck"])
    monkeypatch.setattr(export_check, "load", lambda *a: torch.nn.Identity())
    monkeypatch.setattr(export_check, "stage_config", lambda ck: {})
    monkeypatch.setattr(export_check, "data_config", lambda ck, cfg: {"template": "vicuna_v1"})
    monkeypatch.setattr(export_check, "image_reading_of", lambda cfg: None)
    monkeypatch.setattr(
        export_check, "generate_set", lambda *a, **k: [("q0", "red", records[0]), ("q1", "blue", records[1])]
    )
    monkeypatch.setattr(export_check, "exported_answers", lambda *a: ["red", "green"])
    result = export_check.compare_with_export("ck", tmp_path / "out", questions)
    assert result["n"] == 2 and result["same_answers"] == 1
    assert result["alignlm_accuracy"] == 1.0 and result["export_accuracy"] == 0.5


# ---- geometry suite --------------------------------------------------------------------------------------------------


def test_the_suite_scores_neighbour_lists_in_the_order_a_then_b():
    """The list metrics compare A's neighbour lists with B's in that order (cycle kNN is not symmetric): the suite
    must give what each metric gives on its own."""
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(40, 6, generator=gen).double(), torch.randn(40, 9, generator=gen).double()
    names = list(M.LIST_SCORES)
    got = pair_metrics(A, B, names, topk=5)
    for name in names:
        want = M.LIST_SCORES[name](*M.knn_lists(A, B, 5))
        assert got[name] == pytest.approx(want), name
    assert any(M.LIST_SCORES[n](*M.knn_lists(A, B, 5)) != M.LIST_SCORES[n](*M.knn_lists(B, A, 5)) for n in names)


def test_the_suite_leaves_features_the_caller_prepared_unclamped():
    """With ``preprocess=False`` the caller's features are used as given: clamping them again changes CKA when some
    entries are outliers."""
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(30, 8, generator=gen).double(), torch.randn(30, 8, generator=gen).double()
    A[:3] *= 50  # outliers the clamp would cut
    got = pair_metrics(A, B, ["cka"], preprocess=False)["cka"]
    assert got == pytest.approx(M.cka(A, B, preprocess=False))
    assert got != pytest.approx(M.cka(A, B, preprocess=True))


def test_v2l_words_leaves_the_towers_cls_token_out_of_the_patch_grid(colour_set, tmp_path):
    """With a tower that puts a pooled token before its patches (``select_feature=cls_patch``) the printed grid holds
    the patch words only: the pooled token's word would shift every row of the grid by one."""
    overrides = ("model/connector=v2l", "model.vision.select_feature=cls_patch", "run=[pretrain]")
    run(compose(*tiny_overrides(colour_set, tmp_path, *overrides, "stages.pretrain.max_steps=1")))
    final, out = tmp_path / "t" / "pretrain" / "final", tmp_path / "words.json"
    argv = ["v2l-words", str(final), "--data", str(colour_set["pretrain"]), "--limit", "1", "--json", str(out)]
    assert main(argv) == 0
    model = load_model(final)
    (report,) = json.loads(out.read_text()).values()
    assert model.vision.num_prefix_tokens == 1
    assert len(report["patches"]) == model.vision.num_patches - 1 == 16
