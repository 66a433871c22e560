"""SIMA: self-generated answers judged by the model itself become preference records a dpo stage trains on, and the
critic check scores the judge against the reference answers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from alignlm.commands import console, main
from alignlm.data.build import build_dataset
from alignlm.evaluation.preferences import judge_agreement
from alignlm.methods.sima import generate
from alignlm.methods.sima.generate import critic_question, prepare_preferences
from alignlm.models.build import build_model
from alignlm.models.connectors.mlp import MLPConnector
from alignlm.models.io import UnsafeConfigError, config_yaml
from alignlm.pipeline import run, run_prepare_steps
from alignlm.training.checkpoint import save_final
from tests.conftest import compose, tiny_overrides, write_colour_set


def test_the_critic_check_counts_only_pairs_with_one_right_answer():
    def pair(a, b, chosen, consistent=True, p_first=0.9, p_second=0.9):
        return {
            "answer": "red",
            "a": a,
            "b": b,
            "chosen": chosen,
            "consistent": consistent,
            "p_a_first": p_first,
            "p_a_second": p_second,
        }

    pairs = [
        pair("red", "blue", "red"),  # right
        pair("blue", "Red.", "blue", consistent=False, p_first=0.9, p_second=0.2),  # wrong; normalisation: Red. == red
        pair("blue", "green", "blue"),  # both wrong: not informative
        pair("red", "the red", "red"),  # both right: not informative
    ]
    report = judge_agreement(pairs)
    assert report["pairs"] == 4 and report["informative"] == 2 and report["agreement"] == 0.5
    assert report["a_right"] == 0.5 and report["chose_a"] == 1.0
    assert report["informative_consistent"] == 1 and report["agreement_consistent"] == 1.0
    assert report["consistent"] == 3 and report["prefers_first_shown"] == pytest.approx(5 / 8)


def test_the_critic_question_names_the_reference_both_answers_and_the_three_criteria():
    text = critic_question("What color is it?", "red", "blue", "red")
    assert "Reference answer: red" in text and "Answer A: blue" in text and "Answer B: red" in text
    assert all(word in text for word in ("objects", "relationships", "attributes")) and text.endswith("Reply A or B.")


def test_sima_generate_writes_records_a_dpo_stage_reads(colour_set, tmp_path):
    overrides = tiny_overrides(colour_set, tmp_path, "run=[finetune]", "stages.finetune.init_from=null", "eval.sets=[]")
    run(compose(*overrides, "stages.finetune.data.template=chat"))
    final = tmp_path / "t" / "finetune" / "final"
    out = tmp_path / "sima"
    args = ["sima", "generate", str(final), "--set", f"colours={colour_set['instruct']}", "--out", str(out)]
    assert main([*args, "--limit", "8", "--samples", "3", "--keep-inconsistent"]) == 0
    critic = json.loads((out / "colours.critic.json").read_text())
    records = json.loads((out / "colours.json").read_text())
    assert critic and len(records) == len(critic)  # nothing dropped with --keep-inconsistent
    for p in critic:
        assert (
            0 <= p["p_a_first"] <= 1
            and 0 <= p["p_a_second"] <= 1
            and p["a"] != p["b"]
            and p["chosen"] in (p["a"], p["b"])
        )
    cfg = compose(
        *overrides,
        "+stage@stages.dpo=dpo",
        f"stages.dpo.data.sources=[{{path:{out / 'colours.json'},image_root:{colour_set['instruct'].parent}}}]",
    )
    dataset = build_dataset(cfg.stages.dpo.data, build_model(cfg.model), 0)
    assert len(dataset) == len(records) and isinstance(dataset[0], tuple)
    report = json.loads((out / "critic_check.json").read_text())["colours"]
    assert report["pairs"] == len(critic)


@pytest.mark.parametrize("template", ["vicuna_v1", "chat"])
def test_the_judge_scores_the_replies_as_the_template_writes_them(tiny_model, colour_set, tmp_path, template):
    """After vicuna_v1's "ASSISTANT:" a reply starts with a space: the tiny tokenizer writes " A" as one token and " B"
    as " " then "B"; the judge read the bare "A" and "B", tokens the model is never trained to write there."""
    from alignlm.data.templates import get_template, to_turns, tokenize
    from alignlm.methods.sima.generate import answer_tokens, judge

    model = tiny_model().eval()
    tok = model.tokenizer
    data = {"template": template, "max_length": 512}
    a, b = answer_tokens(tok, data)
    if template == "vicuna_v1":
        assert (tok.convert_ids_to_tokens(a), tok.convert_ids_to_tokens(b)) == (["ĠA"], ["Ġ", "B"])
    else:
        assert (a, b) == (tok.encode("A", add_special_tokens=False), tok.encode("B", add_special_tokens=False))
    record = json.loads(colour_set["test"].read_text())[0]
    questions = ["<image>\nWhich is better?", "<image>\nA much longer question, to pad the other prompt on the left?"]
    pairs = [{"id": str(i), "image": record["image"], "conversations": [{"from": "human", "value": q}]} for i, q in enumerate(questions)]  # fmt: skip
    got = judge(model, pairs, data, str(colour_set["test"].parent), tmp_path, batch=2)
    from alignlm.data.images import load_rgb, preprocess

    pixels = preprocess(load_rgb(colour_set["test"].parent / record["image"]), model.image_spec)[None]
    for q, p in zip(questions, got):  # each prompt alone, unpadded, each reply scored token by token
        rendered = get_template(template).render(to_turns([{"from": "human", "value": q}]), tok, True)
        prompt = tokenize(rendered, tok)[0].tolist()
        prompt = [t for i in prompt for t in ([i] * model.num_image_tokens if i == model.image_token_id else [i])]
        scores = []
        for reply in (a, b):
            ids = torch.tensor([prompt + reply])
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100),
                     "pixel_values": pixels}  # fmt: skip
            with torch.no_grad():
                logps = model(batch, return_logits=True).logits[0].float().log_softmax(-1)
            scores.append(sum(logps[len(prompt) - 1 + k, t] for k, t in enumerate(reply)))
        assert p == pytest.approx(torch.softmax(torch.stack(scores), 0)[0].item(), abs=1e-4)


class StubModel:
    """Stands in for a loaded checkpoint: ``tag`` is the text of its model.safetensors."""

    def __init__(self, final: str) -> None:
        self.tag = Path(final, "model.safetensors").read_text()

    def to(self, device: str) -> StubModel:
        return self


@pytest.fixture
def stub_sima(monkeypatch, caplog) -> list[str]:
    """SIMA's prepare step with the model's work stubbed out: each record's chosen answer is ``<weights>: <reference
    answer>``, so a test reads what the records were made from; returns the checkpoints loaded, and catches the
    step's warnings in ``caplog`` (the alignlm logger does not propagate to the root)."""
    loaded = []
    monkeypatch.setattr(generate, "load_model", lambda final, *_: loaded.append(final) or StubModel(final))
    monkeypatch.setattr(generate, "default_device", lambda: "cpu")
    monkeypatch.setattr(generate, "generate_set", lambda model, path, *_: [(None, model.tag, None)] * len(json.loads(Path(path).read_text())))  # fmt: skip

    def pairs(model, prompts, *_):
        return [{"prompt": p, "a": f"{model.tag}: {p['answer']}", "b": "?", "p_a_first": 0.9, "p_a_second": 0.9} for p in prompts]  # fmt: skip

    monkeypatch.setattr(generate, "self_critic_pairs", pairs)
    monkeypatch.setattr(logging.getLogger(generate.__name__), "handlers", [caplog.handler])
    return loaded


def test_sima_prepare_generates_again_from_a_retrained_model_or_a_changed_set_and_refuses_other_knobs(
    stub_sima, tmp_path, caplog
):
    """The step kept any <set>.json that existed, whatever checkpoint it was given: a rerun after the model was
    retrained trained DPO on the old model's pairs, and a checkpoint that did not exist went unnoticed."""
    instruct = write_colour_set(tmp_path / "colours", n=3)["instruct"]
    final = tmp_path / "finetune" / "final"
    final.mkdir(parents=True)
    (final / "config.yaml").write_text("model: {}")
    (final / "model.safetensors").write_text("first model")
    out = tmp_path / "sima"

    def prepare(checkpoint=final, **knobs) -> set[str]:
        sets = [{"name": "colours", "path": str(instruct)}]
        prepare_preferences(str(checkpoint), sets, str(out), {"template": "chat"}, **knobs)
        return {r["chosen"] for r in json.loads((out / "colours.json").read_text())}

    assert prepare() == {"first model: red", "first model: green", "first model: blue"}
    assert prepare() and len(stub_sima) == 1  # current: the model is not even loaded
    (final / "model.safetensors").write_text("the retrained model")
    assert prepare() == {"the retrained model: red", "the retrained model: green", "the retrained model: blue"}
    assert "what they were made from changed (checkpoint)" in caplog.text
    records = json.loads(instruct.read_text())
    records[0]["conversations"][1]["value"] = "purple"  # the set regenerated under the same path
    instruct.write_text(json.dumps(records))
    assert "the retrained model: purple" in prepare()
    with pytest.raises(ValueError, match="written with samples=2, but the sima step asks for samples=3"):
        prepare(samples=3)
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'gone'} does not exist"):
        prepare(tmp_path / "gone")
    (out / "colours.provenance.json").unlink()  # as written before SIMA recorded what its records were made from
    caplog.clear()
    prepare()
    assert (
        len(stub_sima) == 4
        and "they record nothing of what they were made from (written before they did)" in caplog.text
    )


class PlugInConnector(MLPConnector):
    """A connector outside alignlm's packages: the kind of part a checkpoint may name only with allow_code."""


@pytest.fixture
def plug_in_final(colour_set, tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """An untrained ``final/`` of a model whose connector is :class:`PlugInConnector`, and the overrides of its run;
    SIMA's answering and judging are stubbed out (every prompt gives one pair, "a" chosen), the model is loaded."""
    overrides = [
        *tiny_overrides(colour_set, tmp_path, "run=[finetune]", "stages.finetune.init_from=null"),
        f"model.connector._target_={__name__}.PlugInConnector",
    ]
    cfg = compose(*overrides)
    final = tmp_path / "t" / "finetune" / "final"
    save_final(final, build_model(cfg.model), config_yaml(cfg), ["connector"], "finetune")
    monkeypatch.setattr(generate, "default_device", lambda: "cpu")
    monkeypatch.setattr(generate, "generate_set", lambda model, path, *_: [(None, "x", None)] * len(json.loads(Path(path).read_text())))  # fmt: skip

    def pairs(model, prompts, *_):
        assert isinstance(model.connector, PlugInConnector)
        return [{"prompt": p, "a": "a", "b": "b", "p_a_first": 0.9, "p_a_second": 0.9} for p in prompts]

    monkeypatch.setattr(generate, "self_critic_pairs", pairs)
    return final, overrides


def test_sima_generate_loads_a_plug_in_checkpoint_with_allow_code_the_flag_its_refusal_names(
    plug_in_final, colour_set, tmp_path, capsys
):
    """`alignlm sima generate` had no --allow-code, while its refusal of a checkpoint with a plug-in part told the
    user to pass it: no plug-in model could make SIMA pairs."""
    final, _ = plug_in_final
    args = ["sima", "generate", str(final), "--set", f"colours={colour_set['instruct']}", "--out", str(tmp_path / "s")]
    assert console(args) == 1
    assert "is not one of alignlm's part classes" in capsys.readouterr().err
    assert console([*args, "--limit", "2", "--allow-code"]) == 0
    assert len(json.loads((tmp_path / "s" / "colours.json").read_text())) == 2


def test_the_sima_prepare_step_builds_the_runs_own_model_or_a_checkpoints_code_only_with_its_knob(
    plug_in_final, colour_set, tmp_path
):
    """The prepare step loaded its checkpoint with no way to allow code, and its refusal named --allow-code, a flag
    `alignlm train` does not have, although the run's own config named the part. Given ``model: ${model}`` it builds
    the run's own model config with the checkpoint's weights, as the stage starting from the checkpoint does, and
    as the pipeline builds every model of a run; the checkpoint's own config still needs ``allow_code: true``."""
    final, overrides = plug_in_final
    sets = [{"name": "colours", "path": str(colour_set["instruct"])}]
    with pytest.raises(UnsafeConfigError, match="allow_code: true on this prepare step") as refused:
        prepare_preferences(str(final), sets, str(tmp_path / "s"), {"template": "chat"}, limit=2)
    assert "--allow-code" not in str(refused.value) and "model: ${model} (this run's" in str(refused.value)
    prepare_preferences(str(final), sets, str(tmp_path / "s"), {"template": "chat"}, limit=2, allow_code=True)
    assert len(json.loads((tmp_path / "s" / "colours.json").read_text())) == 2
    step = (
        f"+stages.finetune.prepare.sima={{_target_:alignlm.methods.sima.generate.prepare_preferences,_recursive_:false,"
        f"checkpoint:{final},out:{tmp_path / 'own'},data:${{stages.finetune.data}},limit:2,"
        f"sets:[{{name:colours,path:{colour_set['instruct']}}}],model:${{model}}}}"
    )
    run_prepare_steps(compose(*overrides, step))
    assert len(json.loads((tmp_path / "own" / "colours.json").read_text())) == 2


def test_sima_keeps_each_finished_generation_pass_and_its_rerun_makes_the_same_files(
    stub_sima, tmp_path, monkeypatch, caplog
):
    """The step kept nothing of a set until every pass was generated and judged: a run stopped in its last phase left
    only the prompts, and the rerun generated every answer again (hours at SIMA's 17k prompts on one GPU). Each pass
    is now kept as it finishes and reused under the same model, prompts and settings; the files equal an
    uninterrupted run's."""
    instruct = write_colour_set(tmp_path / "colours", n=3)["instruct"]
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.yaml").write_text("model: {}")
    (final / "model.safetensors").write_text("first model")
    passes, stop = [], {"at": None}

    def answers(model, path, data, batch, tokens, limit, generation, seed, *_):
        if seed == stop["at"]:
            raise KeyboardInterrupt("killed at a sampled pass")
        passes.append(seed)
        n = len(json.loads(Path(path).read_text()))
        return [(None, f"{model.tag} t={generation.get('temperature')} seed {seed} #{i}", None) for i in range(n)]

    def pairs(model, prompts, options, *_):  # each prompt's greedy answer against its last sampled one
        return [{"prompt": p, "a": o[0], "b": o[-1], "p_a_first": 0.9, "p_a_second": 0.9} for p, o in zip(prompts, options)]  # fmt: skip

    monkeypatch.setattr(generate, "generate_set", answers)
    monkeypatch.setattr(generate, "self_critic_pairs", pairs)
    caplog.set_level(logging.INFO, logger=generate.__name__)

    def prepare(out: Path, **knobs) -> dict[str, bytes]:
        sets = [{"name": "colours", "path": str(instruct)}]
        prepare_preferences(str(final), sets, str(out), {"template": "chat"}, samples=2, **knobs)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    whole = prepare(tmp_path / "whole")
    assert passes == [0, 1, 2] and {"colours.json", "colours.critic.json", "colours.run2.json"} <= set(whole)
    passes.clear()
    stop["at"] = 1  # killed at the first sampled pass
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "cut")
    assert passes == [0] and (tmp_path / "cut" / "colours.run0.json").exists()
    assert not (tmp_path / "cut" / "colours.json").exists()
    assert not list((tmp_path / "cut").glob(".*"))  # no half-written file left beside
    passes.clear()
    stop["at"] = None
    assert prepare(tmp_path / "cut") == whole and passes == [1, 2]  # only the sampled passes generated again
    assert "colours.run0.json reused" in caplog.text
    (tmp_path / "cut" / "colours.json").unlink()  # made again: every pass reused
    passes.clear()
    assert prepare(tmp_path / "cut") == whole and passes == []
    (tmp_path / "cut" / "colours.json").unlink()
    prepare(tmp_path / "cut", temperature=0.5)  # another temperature: the greedy pass is still the same
    assert passes == [1, 2]
    (tmp_path / "cut" / "colours.json").unlink()
    (final / "model.safetensors").write_text("the retrained model")
    passes.clear()
    caplog.clear()
    assert prepare(tmp_path / "cut", temperature=0.5) != whole and passes == [0, 1, 2]  # another model: all again
    assert "colours.run0.json were made from another model, prompts or settings" in caplog.text
    records = json.loads((tmp_path / "cut" / "colours.json").read_text())
    assert {r["chosen"] for r in records} == {f"the retrained model t=None seed 0 #{i}" for i in range(3)}


def test_sima_writes_its_files_whole_so_a_full_disk_keeps_the_last_ones(stub_sima, tmp_path, monkeypatch):
    """The critic file and the records were written in place (truncate, then write): a full disk or a kill in between
    left half of the last ones, which no rerun or critic check could read."""
    instruct = write_colour_set(tmp_path / "colours", n=3)["instruct"]
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.yaml").write_text("model: {}")
    (final / "model.safetensors").write_text("first model")
    out = tmp_path / "sima"
    sets = [{"name": "colours", "path": str(instruct)}]
    prepare_preferences(str(final), sets, str(out), {"template": "chat"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    opened = Path.open

    def disk_full_at_the_critic(path, mode="r", *args, **kwargs):
        f = opened(path, mode, *args, **kwargs)
        if "w" not in mode or "critic.json" not in path.name:
            return f
        write = f.write

        def half(text):  # the disk fills up halfway through the file
            write(text[: len(text) // 2])
            f.flush()
            raise OSError(28, "No space left on device")

        f.write = half
        return f

    (final / "model.safetensors").write_text("the retrained model")
    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(Path, "open", disk_full_at_the_critic)
        prepare_preferences(str(final), sets, str(out), {"template": "chat"})
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    for name in ("colours.critic.json", "colours.json", "colours.provenance.json"):
        assert after[name] == before[name]  # the last whole ones, still what they were made from
    assert not [name for name in after if name.startswith(".")]


@pytest.fixture
def stub_answers(monkeypatch, tmp_path, caplog) -> tuple[Path, Path, dict]:
    """SIMA's step with a stub model: each pass's answers are ``answers[seed]`` (a list per pass, one per prompt), the
    judge prefers the first answer shown; the real pairing (``self_critic_pairs``) runs. Returns the checkpoint, the
    set and ``answers`` to fill."""
    instruct = write_colour_set(tmp_path / "colours", n=3)["instruct"]
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.yaml").write_text("model: {}")
    (final / "model.safetensors").write_text("a model")
    answers: dict[int, list[str]] = {}
    monkeypatch.setattr(generate, "load_model", lambda final, *_: StubModel(final))
    monkeypatch.setattr(generate, "default_device", lambda: "cpu")
    monkeypatch.setattr(
        generate, "generate_set", lambda model, path, *args: [(None, a, None) for a in answers[args[5]]]
    )
    monkeypatch.setattr(generate, "judge", lambda model, critic, *_: [0.9] * len(critic))
    monkeypatch.setattr(logging.getLogger(generate.__name__), "handlers", [caplog.handler])
    return final, instruct, answers


def test_sima_leaves_out_pairs_with_an_empty_answer_and_says_how_many(stub_answers, tmp_path, caplog):
    """A model that answered nothing (the demo after a short run) gave pairs with an empty chosen or rejected answer,
    which the dpo stage refused as "malformed record: 80", saying no more: +exp=sima stopped with 0 usable records."""
    final, instruct, answers = stub_answers
    sets = [{"name": "colours", "path": str(instruct)}]
    # per pass (greedy, then two sampled), one answer per prompt q0, q1, q2
    answers |= {0: ["", "green", "blue"], 1: ["red", "", "blue"], 2: ["pink", "red", " "]}
    prepare_preferences(str(final), sets, str(tmp_path / "s"), {"template": "chat"}, drop_inconsistent=False)
    records = json.loads((tmp_path / "s" / "colours.json").read_text())
    assert [(r["id"], {r["chosen"], r["rejected"]}) for r in records] == [("q1", {"green", "red"})]
    assert "SIMA left out 4 of 5 answer pairs with an empty answer (e.g. prompt q0: greedy '', sampled 'red')" in (
        caplog.text
    )
    answers |= {k: ["", " ", ""] for k in range(3)}
    with pytest.raises(ValueError, match=r"no prompt of 3 had two different non-empty answers \(9 of 9 answers were"):
        prepare_preferences(str(final), sets, str(tmp_path / "none"), {"template": "chat"}, drop_inconsistent=False)


def test_sima_records_are_read_under_the_sets_folder_and_anywhere_else_stop_start_up_naming_it(
    stub_answers, tiny_model, tmp_path
):
    """`alignlm sima generate --out prefs` writes the set's image paths as the set has them, relative to its folder:
    the README's dpo command, reading prefs/<set>.json with no image_root, looked for the images under prefs/ and
    skipped every sample, step after step. With the set's folder as image_root (the override generate prints) they
    read; under the records' own folder start-up stops, naming the path and the folder. (Absolute paths were tried:
    a project moved or mounted elsewhere then kept records that name the old place.)"""
    from alignlm.data.llava import LlavaDataset
    from alignlm.data.records import DataError, Source
    from alignlm.data.templates import get_template

    final, instruct, answers = stub_answers
    answers |= {0: ["red", "green", "blue"], 1: ["pink", "red", "red"], 2: ["red", "green", "blue"]}
    out = tmp_path / "prefs"
    sets = [{"name": "colours", "path": str(instruct)}]
    prepare_preferences(str(final), sets, str(out), {"template": "chat"}, drop_inconsistent=False)
    records = json.loads((out / "colours.json").read_text())
    assert [r["image"] for r in records] == [f"images/{i}.png" for i in range(3)]
    model = tiny_model()

    def pairs(root: Path | None, **kwargs) -> LlavaDataset:
        source = Source(str(out / "colours.json"), str(root) if root else None)
        args = (model.tokenizer, get_template("chat"), model.image_spec, model.num_image_tokens)
        return LlavaDataset([source], *args, preference=True, **kwargs)

    ds = pairs(instruct.parent)
    assert len(ds) == 3 and all(isinstance(ds[i], tuple) for i in range(3))
    with pytest.raises(DataError, match=rf"image {out / 'images' / '0.png'} does not exist, nor does its folder"):
        pairs(None)
    from alignlm.commands.sima import dpo_sources  # the override `alignlm sima generate` prints

    assert dpo_sources(sets, str(out)) == (
        f"'stages.dpo.data.sources=[{{path:{out / 'colours.json'},image_root:{instruct.parent}}}]'"
    )


def test_sima_reads_the_second_judging_order_as_the_probability_that_a_is_better(monkeypatch, tmp_path):
    """The second critic record shows ``b`` first, so the judge's p(first better) there is p(b better): a judge that
    always prefers "red" wherever it is shown gives p(a better) 0.8 in both orders (not 0.8 and 0.2, which had made
    every pair look inconsistent and averaged the preference away)."""
    from alignlm.methods.sima import generate

    def judge(model, critic, *_):
        return [0.8 if "Answer A: red" in r["conversations"][0]["value"] else 0.2 for r in critic]

    monkeypatch.setattr(generate, "judge", judge)
    prompt = {"id": "q0", "image": "0.png", "answer": "red",
              "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}]}  # fmt: skip
    pairs = generate.self_critic_pairs(None, [prompt], [["red", "blue"]], {}, "", tmp_path, 2)
    assert [(p["a"], p["b"]) for p in pairs] == [("red", "blue")]
    assert pairs[0]["p_a_first"] == pytest.approx(0.8) and pairs[0]["p_a_second"] == pytest.approx(0.8)


def test_sima_samples_its_answers_as_the_official_code_does_and_the_nucleus_is_part_of_the_records_knobs(capsys):
    """Sampled answers at temperature 0.8 from the nucleus 0.9 (the official code's; the whole distribution at 1.0
    had given rejected answers from a flatter, untruncated distribution): the step's, the command's and the recipe's
    defaults; another nucleus makes other records, and one outside (0, 1] is refused."""
    import inspect

    knobs = inspect.signature(prepare_preferences).parameters
    assert knobs["temperature"].default == 0.8 and knobs["top_p"].default == 0.9
    step = compose("+exp=sima").stages.dpo.prepare.sima
    assert step.temperature == 0.8 and step.top_p == 0.9
    sampled = {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 0.9}
    assert generate.GenerationSettings(2, 0.8, 0.9, 8, 16, 0, "cpu").passes() == [
        {"do_sample": False},
        sampled,
        sampled,
    ]
    data = {"template": "plain"}
    assert generate.preference_knobs(data, 2, 0.8, 0.9, 8, None, True, 0) != generate.preference_knobs(
        data, 2, 0.8, 1.0, 8, None, True, 0
    )
    with pytest.raises(SystemExit):
        main(["sima", "generate", "final", "--set", "a=b.json", "--out", "o", "--top-p", "1.5"])
    assert "--top-p" in capsys.readouterr().err
