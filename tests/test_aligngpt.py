"""AlignGPT alignment levels: equal-count bucketing and the levels file, the <align> slot after BOS for every template,
H[level] in pretraining and the gate's mixture otherwise, which half trains in which stage, generation, save/reload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignlm.commands import main
from alignlm.constants import IGNORE_INDEX, IMAGE_TOKEN
from alignlm.data.build import build_dataset
from alignlm.data.collate import Collator
from alignlm.data.images import ImageSpec
from alignlm.data.llava import LlavaDataset
from alignlm.data.records import DataError, Source
from alignlm.data.templates import get_template
from alignlm.methods.aligngpt.levels import LevelLabels, equal_count_levels, make_levels
from alignlm.methods.aligngpt.part import ALIGN_TOKEN
from alignlm.models.tokenizer import build_tiny_tokenizer
from alignlm.objectives.base import check_batch
from alignlm.training.stages import apply_stage
from tests.conftest import COLOURS, compose, make_batch, tiny_overrides, waits_in_training_steps
from tests.test_sea import tiny_clip

WITH_LEVELS = "+model/align_levels=aligngpt"


class ColourEncoder:
    """A stand-in dual encoder: an image is its mean RGB, a caption the RGB of the colour it names."""

    name = "colour-stub"

    def encode_images(self, images: list) -> torch.Tensor:
        return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images]))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([COLOURS[next(c for c in COLOURS if c in t)] for t in texts], dtype=torch.float32)


@pytest.fixture(scope="module")
def mismatched(colour_set, tmp_path_factory) -> tuple[Path, set[str]]:
    """The colour captions with every third one naming the wrong colour, plus one text-only and one broken record, in
    a folder of their own that links the colour images in (LLaVA's layout links its image folders)."""
    records = json.loads(colour_set["pretrain"].read_text())
    folder = tmp_path_factory.mktemp("mismatched")
    (folder / "images").symlink_to(colour_set["pretrain"].parent / "images", target_is_directory=True)
    wrong = set()
    for i, rec in enumerate(records):
        assert rec["image"].startswith("images/")
        if i % 3 == 0:
            name = list(COLOURS)[(i + 1) % 3]  # the image shows colour i % 3
            rec["conversations"][1]["value"] = f"A {name} square."
            wrong.add(rec["id"])
    records.append(
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A red word."}]}
    )
    records.append({"id": "broken", "image": "missing.png", "conversations": records[1]["conversations"]})
    path = folder / "pretrain.json"
    path.write_text(json.dumps(records))
    return path, wrong


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("clip"))


# ---- levels ---------------------------------------------------------------------------------------------------------


def test_equal_count_bins_by_rank(rng):
    scores = np.round(rng.normal(size=103), 1)  # many ties
    levels, edges = equal_count_levels(scores, 8)
    counts = np.bincount(levels, minlength=8)
    assert counts.sum() == 103 and counts.max() - counts.min() <= 1
    for k in range(1, 8):  # bins are ordered by score and each edge is its bin's lowest score
        assert scores[levels == k - 1].max() <= scores[levels == k].min() == edges[k - 1]
    order = np.argsort(scores, kind="stable")
    assert np.all(np.diff(levels[order]) >= 0)
    with pytest.raises(DataError, match="cannot fill 8"):
        equal_count_levels(scores[:5], 8)


def test_levels_file_ranks_mismatched_pairs_lowest(mismatched, tmp_path):
    data, wrong = mismatched
    levels = LevelLabels(make_levels(tmp_path / "levels.json", [data], ColourEncoder(), num_levels=4))
    assert levels.encoder == "colour-stub" and levels.num_levels == 4 and len(levels.edges) == 3
    assert levels.counts == [12, 12, 12, 12] and levels.skipped == {"no image": 1, "unreadable image": 1}
    assert levels.get("text") is None and levels.get("broken") is None
    assert sorted(levels.get(r) for r in wrong) == [0] * 12 + [1] * 4  # the 16 wrong captions score lowest
    assert min(v for r, v in levels.levels.items() if r not in wrong) == 1
    with pytest.raises(DataError, match="holds 4 levels but model.align_levels.num_levels=8"):
        levels.check(8)
    meta = json.loads((tmp_path / "levels.json").read_text())
    first = next(iter(meta["levels"]))
    for key, value in (("level", 2.9), ("level", "3"), ("level", True), ("num_levels", 4.7)):
        edited = {**meta, "levels": {**meta["levels"], first: value}} if key == "level" else {**meta, key: value}
        (tmp_path / "edited.json").write_text(json.dumps(edited))  # 2.9 was read as level 2, "3" as 3, 4.7 as 4
        with pytest.raises(DataError, match=f"every level must be whole numbers; got {value!r}"):
            LevelLabels(tmp_path / "edited.json")


def test_the_prepare_step_writes_levels_again_when_data_or_encoder_changed_and_refuses_another_L(mismatched, tmp_path):
    """Levels kept after the captions were regenerated under the same ids, or after the recipe named another
    encoder, were served as if current (the file even recorded the old encoder's name)."""
    from alignlm.methods.aligngpt.levels import ensure_levels

    source, _ = mismatched
    (tmp_path / "images").symlink_to(source.parent / "images", target_is_directory=True)
    data, out = tmp_path / "pretrain.json", tmp_path / "levels.json"
    records = json.loads(source.read_text())
    data.write_text(json.dumps(records))
    node = {"out": out, "data": [str(data)], "encoder": ColourEncoder(), "num_levels": 4}
    ensure_levels(**node)
    stamp = out.stat().st_mtime_ns
    ensure_levels(**node)  # nothing changed: kept
    assert out.stat().st_mtime_ns == stamp

    for i, rec in enumerate(records[:48]):  # regenerated: every caption now names its image's colour
        rec["conversations"][1]["value"] = f"A {list(COLOURS)[i % 3]} square."
    data.write_text(json.dumps(records))
    ensure_levels(**node)
    fresh = LevelLabels(make_levels(tmp_path / "fresh.json", [data], ColourEncoder(), num_levels=4))
    assert LevelLabels(out).levels == fresh.levels

    class OtherEncoder(ColourEncoder):
        name = "another-encoder"

    ensure_levels(**{**node, "encoder": OtherEncoder()})
    assert LevelLabels(out).encoder == "another-encoder"
    with pytest.raises(ValueError, match=r"levels.json was written with num_levels=4, but the aligngpt_levels step"):
        ensure_levels(**{**node, "num_levels": 2})


def test_an_image_given_as_a_list_of_one_gets_its_level(mismatched, tmp_path):
    """Datasets that always write `image` as a list once had every record skipped as "several images"."""
    data, _ = mismatched
    records = json.loads(data.read_text())
    for r in records:
        if "image" in r:
            r["image"] = [r["image"]]
    records.append({**records[0], "id": "two", "image": records[0]["image"] * 2})
    listed = data.with_name("listed.json")
    listed.write_text(json.dumps(records))
    levels = LevelLabels(make_levels(tmp_path / "levels.json", [listed], ColourEncoder(), num_levels=4))
    plain = LevelLabels(make_levels(tmp_path / "plain.json", [data], ColourEncoder(), num_levels=4))
    assert levels.levels == plain.levels and len(levels.levels) == 48
    assert levels.skipped == {"no image": 1, "unreadable image": 1, "several images": 1}


def test_cli_scores_pairs_with_a_saved_clip(mismatched, clip_path, tmp_path, capsys):
    out = tmp_path / "levels.json"
    assert (
        main(
            [
                "aligngpt-levels",
                "--data",
                str(mismatched[0]),
                "--encoder",
                str(clip_path),
                "--levels",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == [16, 16, 16] and summary["encoder"] == str(clip_path) and summary["pairs"] == 48


# ---- the <align> slot -------------------------------------------------------------------------------------------------


def _tokenizer(with_bos: bool):
    from tokenizers.processors import TemplateProcessing

    tok = build_tiny_tokenizer()
    tok.add_special_tokens(
        {"additional_special_tokens": [IMAGE_TOKEN, ALIGN_TOKEN]}, replace_extra_special_tokens=False
    )
    if with_bos:  # Llama-like: the tokenizer starts every sequence with BOS itself
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
        )
    return tok


@pytest.mark.parametrize("for_generation", [False, True], ids=["train", "prompt"])
@pytest.mark.parametrize("template,split", [("plain", "pretrain"), ("vicuna_v1", "instruct"), ("chat", "instruct")])
@pytest.mark.parametrize("with_bos", [False, True], ids=["no_bos", "bos"])
def test_slot_lands_right_after_bos_with_an_ignored_label(colour_set, with_bos, template, split, for_generation):
    tok = _tokenizer(with_bos)
    align = tok.convert_tokens_to_ids(ALIGN_TOKEN)

    def sample(token: int | None) -> dict:
        return LlavaDataset(
            [Source(str(colour_set[split]))],
            tok,
            get_template(template),
            ImageSpec(16, (0.5,) * 3, (0.5,) * 3),
            num_image_tokens=4,
            for_generation=for_generation,
            slot_token_ids=[token] if token else (),
        )[0]

    got, plain = sample(align), sample(None)
    ids, labels = got["input_ids"], got["labels"]
    starts_with_bos = with_bos  # the tokenizer's BOS, whatever the template writes (as processor(text=...) adds it)
    at = 1 if starts_with_bos else 0
    assert torch.nonzero(ids == align).flatten().tolist() == [at] and labels[at] == IGNORE_INDEX
    assert (ids[0] == tok.bos_token_id) == starts_with_bos
    keep = torch.arange(len(ids)) != at  # everything else is exactly the sequence without AlignGPT
    assert torch.equal(ids[keep], plain["input_ids"]) and torch.equal(labels[keep], plain["labels"])


def test_models_without_levels_are_untouched(tiny_model):
    model = tiny_model()
    assert model.PARTS == ("vision", "connector", "llm") and not model.extras and model.slot_token_ids == []
    assert ALIGN_TOKEN not in model.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="unknown parts"):
        apply_stage(model, {"align_levels": "levels"})


# ---- the model side ---------------------------------------------------------------------------------------------------


def _with_slot(model, batch: dict, prompt: int = 0) -> dict:
    """``make_batch`` rows with the <align> slot first and the first ``prompt`` text tokens unsupervised."""
    rows = batch["input_ids"].shape[0]
    labels = batch["labels"].clone()
    for r in range(rows):
        text = torch.nonzero(batch["input_ids"][r] != model.image_token_id).flatten()[:prompt]
        labels[r, text] = IGNORE_INDEX
    column = lambda v: torch.full((rows, 1), v)  # noqa: E731
    return {
        **batch,
        "input_ids": torch.cat([column(model.extras["align_levels"]), batch["input_ids"]], 1),
        "labels": torch.cat([column(IGNORE_INDEX), labels], 1),
        "attention_mask": torch.cat([column(1), batch["attention_mask"]], 1),
    }


def test_level_token_is_H_of_the_level_or_the_gated_mixture(tiny_model):
    """A sample with an image gets ``H[level]`` (pretraining) or the gate's mixture at its slot; a text-only sample
    has no slot, as in the official code (it had one, where the gate's mixture from no visual tokens put one learned
    constant token before every text-only sample)."""
    model = tiny_model(WITH_LEVELS)
    levels = model.align_levels
    batch = _with_slot(model, make_batch(model, [1, 2, 0]), prompt=3)
    batch["input_ids"][2, 0] = 10  # the text-only sample: a word where the others have their slot
    table = model.llm.get_input_embeddings()
    with torch.no_grad():
        embeds, _ = model.embed({**batch, "align_levels": torch.tensor([0, 3, 7])})
        torch.testing.assert_close(embeds[:2, 0], levels.embeddings[[0, 3]])
        torch.testing.assert_close(embeds[2, 0], table.weight[10])
        mixed, _ = model.embed(batch)
        visual = model.connector(model.vision(batch["pixel_values"])).tokens
        per_sample = torch.stack([visual[0], visual[1:3].mean(0)])
        ids = batch["input_ids"][:2]
        prompt = [
            row[(row != model.image_token_id) & (row != model.extras["align_levels"])][:3] for row in ids
        ]  # unsupervised text
        text = torch.stack([table(t).mean(0) for t in prompt])
        torch.testing.assert_close(mixed[:2, 0], levels.gated(per_sample, text))
        torch.testing.assert_close(mixed[:, 1:], embeds[:, 1:])  # only the slots differ
        torch.testing.assert_close(mixed[2], embeds[2])
    with pytest.raises(ValueError, match="exactly one <align> slot"):
        model.embed({**batch, **{k: batch[k][:, 1:] for k in ("input_ids", "attention_mask", "labels")}})
    batch["input_ids"][2, 0] = model.extras["align_levels"]
    with pytest.raises(ValueError, match="a sample without one none"):
        model.embed(batch)


@pytest.mark.parametrize("images_only", [True, False])
def test_the_stand_in_for_bad_data_carries_the_slots_a_text_only_sample_gets(tiny_model, colour_set, images_only):
    """A step whose micro-batch was all bad data runs a one-token stand-in: with an extra part whose slot every
    sample gets, the model refused it ("every sample needs exactly one slot"), which ended the run."""
    from types import SimpleNamespace

    from alignlm.training.trainer import Trainer

    model = tiny_model(WITH_LEVELS)
    model.align_levels.with_images_only = images_only
    dataset = build_dataset({"template": "vicuna_v1", "sources": [{"path": str(colour_set["instruct"])}]}, model, 0)
    fake = SimpleNamespace(dataset=dataset, acc=SimpleNamespace(device=torch.device("cpu")))
    stand_in = Trainer.stand_in_batch.__get__(fake)
    assert int((stand_in["input_ids"] == model.extras["align_levels"]).sum()) == (0 if images_only else 1)
    with torch.no_grad():
        model.embed(stand_in)


def test_only_samples_with_an_image_get_the_level_slot(tiny_model, colour_set):
    """The data pipeline inserts the <align> slot after BOS in a sample with an image and in none without, and a
    generation prompt's length counts it only there."""
    from alignlm.models.generation import prompt_length

    model = tiny_model(WITH_LEVELS)
    records = json.loads(colour_set["instruct"].read_text())[:2]
    records[1].pop("image")
    records[1]["conversations"][0]["value"] = records[1]["conversations"][0]["value"].replace("<image>", "").strip()
    path = colour_set["instruct"].parent / "mixed.json"
    path.write_text(json.dumps(records))
    dataset = build_dataset({"template": "vicuna_v1", "sources": [{"path": str(path)}]}, model, 0)
    slot = model.extras["align_levels"]
    with_image, text_only = dataset[0], dataset[1]
    assert int((with_image["input_ids"] == slot).sum()) == 1 and int((text_only["input_ids"] == slot).sum()) == 0
    at = int(int(with_image["input_ids"][0]) == model.tokenizer.bos_token_id)
    assert int(with_image["input_ids"][at]) == slot  # right after BOS, or first without one
    batch = Collator(model.tokenizer.pad_token_id)([with_image, text_only])
    with torch.no_grad():
        model.embed(batch)  # one slot with the image, none without: accepted
    prompts = build_dataset({"template": "vicuna_v1", "sources": [{"path": str(path)}]}, model, 0, for_generation=True)
    for i in range(2):
        src, rec = prompts.record(i)
        assert prompt_length(prompts, src, rec) == len(prompts[i]["input_ids"])


def test_the_gate_reads_in_training_the_prompt_it_reads_when_generating(tiny_model, colour_set, monkeypatch):
    """A two-turn record's gate reads the text before its first answer, the prompt that generating that answer
    reads: not its later question, which generation of the first answer never sees."""
    model = tiny_model(WITH_LEVELS).eval()
    seen: list[torch.Tensor] = []
    gated = model.align_levels.gated
    monkeypatch.setattr(model.align_levels, "gated", lambda visual, text: seen.append(text) or gated(visual, text))
    two_turns = build_dataset({"template": "vicuna_v1", "sources": [{"path": str(colour_set["instruct"])}]}, model, 0)
    first_question = build_dataset(  # the same images and first question, as generation prompts
        {"template": "vicuna_v1", "sources": [{"path": str(colour_set["test"])}]}, model, 0, for_generation=True
    )
    with torch.no_grad():
        model.embed(Collator(model.tokenizer.pad_token_id)([two_turns[0], two_turns[1]]))
        model.embed(Collator(model.tokenizer.pad_token_id, "left")([first_question[0], first_question[1]]))
    torch.testing.assert_close(seen[0], seen[1])


def test_before_the_first_answer_covers_each_packed_sample_up_to_its_first_supervised_token():
    from alignlm.methods.aligngpt.part import before_first_answer

    x = IGNORE_INDEX
    sample_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 2, -1, -1, -1]])
    labels = torch.tensor([[x, 5, x, 6, x, x, 7, x], [x, x, x, x, x, x, x, x]])
    keep = before_first_answer(labels, sample_ids, 3) & (sample_ids >= 0)
    assert keep.tolist() == [[1, 0, 0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]


def test_gate_weights_are_a_distribution_over_the_lower_levels(tiny_model):
    levels = tiny_model(WITH_LEVELS).align_levels
    visual, text = torch.randn(5, levels.num_visual_tokens, 64), torch.randn(5, 64)
    a = levels.gate_weights(visual, text)
    assert a.shape == (5, 7) and torch.all(a >= 0)
    torch.testing.assert_close(a.sum(-1), torch.ones(5))
    torch.testing.assert_close(levels.gated(visual, text), a @ levels.embeddings[:7] + levels.embeddings[7])
    levels.set_train_mode("levels")
    assert levels.embeddings.requires_grad and not any(p.requires_grad for p in levels.gate.parameters())
    levels.set_train_mode("gate")
    assert not levels.embeddings.requires_grad and all(p.requires_grad for p in levels.gate.parameters())


def test_stage_parts_and_data_must_agree(tiny_model, colour_set, tmp_path):
    model = tiny_model(WITH_LEVELS)
    data = {"sources": [{"path": str(colour_set["pretrain"])}]}
    eight = make_levels(tmp_path / "l8.json", [colour_set["pretrain"]], ColourEncoder(), 8)
    four = make_levels(tmp_path / "l4.json", [colour_set["pretrain"]], ColourEncoder(), 4)
    hook = lambda path: {
        "hooks": {"levels": {"_target_": "alignlm.methods.aligngpt.hook.LevelHook", "path": str(path)}}
    }  # noqa: E731
    with pytest.raises(ValueError, match=r"choose one of \['frozen', 'levels', 'gate'\]"):
        apply_stage(model, {"connector": "full", "align_levels": "full"})
    apply_stage(model, {"connector": "full", "align_levels": "levels"})
    batch = Collator(model.tokenizer.pad_token_id)([build_dataset(data, model, 0)[i] for i in range(3)])
    with pytest.raises(KeyError, match=r"needs batch fields \['align_levels'\]"):  # levels train only with the hook
        check_batch({"the model's extra parts": model.requires_batch_keys}, batch)
    with pytest.raises(DataError, match="holds 4 levels"):
        build_dataset({**data, **hook(four)}, model, 0)
    dataset = build_dataset({**data, **hook(eight)}, model, 0)
    batch = Collator(model.tokenizer.pad_token_id, hooks=dataset.hooks)([dataset[i] for i in range(3)])
    assert batch["align_levels"].tolist() == [LevelLabels(eight).get(f"p{i}") for i in range(3)]
    check_batch({"the model's extra parts": model.requires_batch_keys}, batch)
    apply_stage(model, {"connector": "full", "align_levels": "gate"})
    assert model.requires_batch_keys == ()
    with pytest.raises(ValueError, match="only parts.align_levels=levels uses"):
        build_dataset({**data, **hook(eight)}, model, 0)
    with pytest.raises(ValueError, match="the model has no AlignGPT part"):
        build_dataset({**data, **hook(eight)}, tiny_model(), 0)


def test_export_refuses_the_level_token(tiny_model):
    from alignlm.export.hf_llava import ExportError, check_exportable

    with pytest.raises(ExportError, match=r"extra input parts \(model.extras: \['align_levels'\]\)"):
        check_exportable(tiny_model(WITH_LEVELS))


# ---- end to end --------------------------------------------------------------------------------------------------------


def test_exp_aligngpt_trains_levels_then_gate_generates_and_reloads(colour_set, clip_path, tmp_path):
    from alignlm.models.build import build_model
    from alignlm.models.io import final_parts, load_model
    from alignlm.pipeline import run

    levels_file = tmp_path / "levels.json"
    args = [
        "+exp=aligngpt",
        "model=tiny",
        "offline_datasets=[]",
        *tiny_overrides(colour_set, tmp_path),
        "stages.pretrain.max_steps=3",
        "stages.finetune.max_steps=2",
        f"stages.pretrain.prepare.aligngpt_levels.out={levels_file}",
        f"stages.pretrain.prepare.aligngpt_levels.data=[{colour_set['pretrain']}]",
        f"stages.pretrain.prepare.aligngpt_levels.encoder={clip_path}",
        "stages.pretrain.prepare.aligngpt_levels.fit=null",
        f"eval.sets=[{{name:colours,path:{colour_set['test']}}}]",
        "eval.limit=4",
    ]
    cfg = compose(*args)
    summary = run(cfg)
    assert LevelLabels(levels_file).counts == [6] * 8  # written by the pipeline's prepare step
    # level-embedding pretraining in whole steps, CUDA's fused AdamW: nothing waits for a GPU
    fused = compose(*args, "run_name=waits", "stages.pretrain.fused_optimizer=true")
    ops, _ = waits_in_training_steps(fused, "pretrain")
    assert ops.seen == []
    assert summary["eval"]["colours"]["n"] == 4  # prompts get the slot and the gate's mixture: generation works
    init = build_model(cfg.model).align_levels
    pre, fine = (load_model(tmp_path / "t" / s / "final") for s in ("pretrain", "finetune"))
    assert not torch.equal(pre.align_levels.embeddings, init.embeddings)  # pretraining trains H ...
    torch.testing.assert_close(pre.align_levels.gate.state_dict(), init.gate.state_dict())  # ... not the gate
    torch.testing.assert_close(fine.align_levels.embeddings, pre.align_levels.embeddings)  # finetuning keeps H ...
    assert not torch.equal(fine.align_levels.gate[0].weight, init.gate[0].weight)  # ... and trains the gate
    assert final_parts(tmp_path / "t" / "finetune" / "final") == ["connector", "llm", "align_levels"]
    data = {"sources": [{"path": str(colour_set["test"])}], "template": "vicuna_v1"}
    batch = Collator(fine.tokenizer.pad_token_id, "left")(
        [build_dataset(data, fine, 0, for_generation=True)[i] for i in range(2)]
    )
    again = load_model(tmp_path / "t" / "finetune" / "final")
    torch.testing.assert_close(fine(batch, return_logits=True).logits, again(batch, return_logits=True).logits)
    torch.testing.assert_close(fine.generate(batch, max_new_tokens=3), again.generate(batch, max_new_tokens=3))


def test_resumed_level_training_matches_an_uninterrupted_run(colour_set, clip_path, tmp_path):
    """Step checkpoints carry the level embeddings, so a stopped and resumed stage reproduces every loss and H."""
    from alignlm.models.io import load_model
    from alignlm.pipeline import run
    from alignlm.training.trainer import StopTraining
    from tests.conftest import read_losses

    base = [
        "+exp=aligngpt",
        "model=tiny",
        "offline_datasets=[]",
        *tiny_overrides(colour_set, tmp_path),
        "run=[pretrain]",
        "stages.pretrain.max_steps=5",
        f"stages.pretrain.prepare.aligngpt_levels.out={tmp_path / 'levels.json'}",
        f"stages.pretrain.prepare.aligngpt_levels.data=[{colour_set['pretrain']}]",
        f"stages.pretrain.prepare.aligngpt_levels.encoder={clip_path}",
        "stages.pretrain.prepare.aligngpt_levels.fit=null",
        "eval.sets=[]",
    ]
    run(compose(*base, "run_name=full"))
    with pytest.raises(StopTraining):
        run(compose(*base, "run_name=resumed", "stop_after_steps=3"))
    run(compose(*base, "run_name=resumed"))
    assert read_losses(tmp_path / "resumed" / "pretrain") == read_losses(tmp_path / "full" / "pretrain")  # bit for bit
    full, resumed = (
        load_model(tmp_path / r / "pretrain" / "final").align_levels.embeddings for r in ("full", "resumed")
    )
    assert torch.equal(resumed, full)


# ---- levels' images read by data-loader workers (fix D3)


def test_pair_scores_read_images_in_worker_processes_with_the_same_scores(colour_set, tmp_path, monkeypatch):
    """The images were read one at a time in the main process while the encoder waited; now ``num_workers``
    processes read them, in order: the same scores, an unreadable image still no level (logged)."""
    import os
    from pathlib import Path

    from alignlm.data import images as images_mod
    from alignlm.methods.aligngpt.levels import caption_pairs, pair_scores

    pairs, _ = caption_pairs([colour_set["pretrain"]])
    paths = [p[1] for p in pairs[:10]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths[3] = Path(broken)
    captions = [p[2] for p in pairs[:10]]
    serial, ok_serial = pair_scores(ColourEncoder(), paths, captions, batch_size=4, num_workers=0)
    load, readers = images_mod.load_rgb, tmp_path / "readers"

    def recording(path, *args):
        with readers.open("a") as f:  # a file: the workers' appends reach it
            f.write(f"{os.getpid()}\n")
        return load(path, *args)

    monkeypatch.setattr("alignlm.models.encoders.load_rgb", recording)
    parallel, ok_parallel = pair_scores(ColourEncoder(), paths, captions, batch_size=4, num_workers=2)
    assert not ok_serial[3] and (ok_serial == ok_parallel).all() and ok_serial.sum() == 9
    np.testing.assert_array_equal(serial[ok_serial], parallel[ok_parallel])
    pids = set(readers.read_text().split())
    assert len(readers.read_text().split()) == 10 and str(os.getpid()) not in pids  # read in the workers


def test_hf_encoder_prepared_pixels_equal_its_encode_images(tiny_clip, colour_set):
    """``image_steps``: the processor run per image in a worker, then ``encode_prepared``, is ``encode_images``."""
    import torch

    from alignlm.data.images import load_rgb
    from alignlm.methods.aligngpt.levels import caption_pairs
    from alignlm.models.encoders import HFDualEncoder, image_steps

    encoder = HFDualEncoder(str(tiny_clip))
    paths = [p[1] for p in caption_pairs([colour_set["pretrain"]])[0][:5]]
    prepare, encode = image_steps(encoder)
    batch = encode(torch.stack([prepare(p) for p in paths]))
    pixels = encoder.image_processor(images=[load_rgb(p) for p in paths], return_tensors="pt")["pixel_values"]
    assert torch.equal(batch, encoder.encode_pixels(pixels).float())
    assert torch.equal(batch, encoder.encode_images([load_rgb(p) for p in paths]))
