"""Export to transformers' LlavaForConditionalGeneration and import back: same logits, same generation, no loss."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from alignlm.commands import main
from alignlm.constants import IMAGE_TOKEN
from alignlm.data.images import preprocess
from alignlm.data.templates import get_template, to_turns, tokenize, turn_end
from alignlm.export.hf_llava import ExportError, export, load_llava_weights, to_llava
from alignlm.models.build import build_model
from alignlm.models.io import load_model
from alignlm.pipeline import run
from tests.conftest import compose, tiny_overrides

SIGLIP = ["model.vision.config.model_type=siglip_vision_model", "model.vision.select_feature=patch"]
QUESTION = [{"from": "human", "value": "<image>\nWhat color is it?"}]


def _train(colour_set, out, *extra: str):
    """A tiny two-stage run; returns the finetune final/ folder."""
    run(compose(*tiny_overrides(colour_set, out, "stages.pretrain.max_steps=2", "stages.finetune.max_steps=2", *extra)))
    return out / "t" / "finetune" / "final"


def _inputs(processor, image: Image.Image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


def _same_model(model, out_dir, image):
    """Logits within 1e-4 and identical greedy decoding, through transformers' own processor."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(out_dir).eval()
    processor = AutoProcessor.from_pretrained(out_dir)
    inputs = _inputs(processor, image)
    # the processor's pixels are alignlm's preprocessing (pad with the mean colour, bicubic resize, normalise)
    torch.testing.assert_close(inputs["pixel_values"][0], preprocess(image, model.image_spec), atol=1e-5, rtol=0)
    batch = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "labels": torch.full_like(inputs["input_ids"], -100),
        "pixel_values": inputs["pixel_values"],
    }
    with torch.no_grad():
        ours = model(batch, return_logits=True).logits
        theirs = hf(**inputs).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    new = model.generate(batch, max_new_tokens=6, do_sample=False)
    ref = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    n = min(new.shape[1], ref.shape[1])
    assert new[:, :n].tolist() == ref[:, :n].tolist() and n > 0


def _prompt_ids(model, template_name, **kwargs):
    rendered = get_template(template_name, **kwargs).render(
        to_turns(QUESTION), model.tokenizer, add_generation_prompt=True
    )
    ids, _ = tokenize(rendered, model.tokenizer)  # the ids training and alignlm's own generation use
    img = model.image_token_id
    out = []
    for t in ids.tolist():
        out += [img] * model.num_image_tokens if t == img else [t]
    return out


@pytest.mark.parametrize("vision", [[], SIGLIP], ids=["clip", "siglip"])
def test_export_gives_the_same_logits_and_generation(colour_set, tmp_path, vision):
    final = _train(colour_set, tmp_path, *vision)
    out = export(final, tmp_path / "hf")
    model = load_model(final)
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    _same_model(model, out, image)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    assert _inputs(processor, image)["input_ids"][0].tolist() == _prompt_ids(model, "vicuna_v1")
    card = (out / "README.md").read_text()
    assert "| finetune |" in card and "vicuna_v1" in card


def test_lora_finetuned_model_exports_merged(colour_set, tmp_path):
    from alignlm.commands import main

    final = _train(colour_set, tmp_path, "stages.finetune.parts.llm=lora", "stages.finetune.lr.llm=1e-2")
    out = tmp_path / "hf"
    assert main(["export", str(final), str(out)]) == 0
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    model = load_model(final)
    base = build_model(compose("model=tiny").model)
    assert not torch.equal(
        model.llm.get_decoder().layers[0].self_attn.q_proj.weight,
        base.llm.get_decoder().layers[0].self_attn.q_proj.weight,
    )
    _same_model(model, out, Image.new("RGB", (30, 30), (20, 200, 40)))


def test_import_export_import_is_lossless_and_trains(colour_set, tmp_path):
    final = _train(colour_set, tmp_path)
    first = export(final, tmp_path / "a")
    cfg = compose("model=llava_hf", f"model.path={first}")
    imported = build_model(cfg.model)
    load_llava_weights(imported, first)
    original = load_model(final)
    ours = {k: v for k, v in original.state_dict().items()}
    for k, v in imported.state_dict().items():
        torch.testing.assert_close(v, ours[k], rtol=0, atol=0, msg=k)
    again = to_llava(imported)
    saved = load_file(str(first / "model.safetensors"))
    for k, v in again.state_dict().items():
        if k in saved:
            assert torch.equal(v, saved[k]), k
    # continue training the imported Llava folder with alignlm (init_from the folder)
    run(
        compose(
            f"output_dir={tmp_path}",
            "mixed_precision=no",  # as the first run (one precision per test process on a GPU too)
            "run_name=cont",
            "run=[finetune]",
            "model=llava_hf",
            f"model.path={first}",
            f"stages.finetune.init_from={first}",
            "stages.finetune.max_steps=2",
            "stages.finetune.per_device_batch_size=2",
            "stages.finetune.data.template=vicuna_v1",
            f"stages.finetune.data.sources=[{{path:{colour_set['instruct']}}}]",
        )
    )
    assert (tmp_path / "cont" / "finetune" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model/connector=linear"], "LinearConnector has no Llava counterpart"),
        (["model.connector.depth=3"], r"MLPConnector\(depth=3\) has no Llava counterpart"),
        (
            ["model/vision=efficientnet_lite0", "model.vision.weights=null"],
            "EfficientNetLiteTower is not a transformers vision model",
        ),
        (["model.visual_token_norm=1.0"], "fixed norm"),
    ],
)
def test_unsupported_combinations_fail_up_front(overrides, match):
    model = build_model(compose("model=tiny", *overrides).model)
    with pytest.raises(ExportError, match=match) as err:
        to_llava(model)
    assert "alignlm's own format" in str(err.value)


def test_export_of_a_non_llava_model_writes_nothing(colour_set, tmp_path, capsys):
    final = _train(colour_set, tmp_path, "model/connector=linear")
    with pytest.raises(ExportError):
        export(final, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    # the command says why in one line, with its own exit status, and writes nothing either
    assert main(["export", str(final), str(tmp_path / "hf")]) == 2
    assert "alignlm export: " in capsys.readouterr().err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("template", ["vicuna_v1", "chat"])
def test_export_stops_where_the_template_ends_a_turn(colour_set, tmp_path, template):
    """transformers' generate stops where alignlm's does: at the template's end of turn, also when that is not EOS."""
    from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

    final = _train(
        colour_set,
        tmp_path,
        f"stages.finetune.data.template={template}",
        "stages.finetune.max_steps=40",
        "stages.finetune.lr.llm=3e-3",
        "stages.finetune.lr.connector=3e-3",
    )
    out = export(final, tmp_path / "hf")
    model = load_model(final)
    end = model.tokenizer.convert_tokens_to_ids("</s>" if template == "vicuna_v1" else "<|im_end|>")
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    processor = AutoProcessor.from_pretrained(out)
    assert end in (stops if isinstance(stops, list) else [stops]) and processor.tokenizer.eos_token_id == end
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    inputs = _inputs(processor, Image.new("RGB", (30, 30), (200, 40, 40)))
    batch = {
        **{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")},
        "labels": torch.full_like(inputs["input_ids"], -100),
    }
    stop = turn_end(get_template(template), model.tokenizer)
    ours = model.generate(batch, max_new_tokens=12, stop=stop, do_sample=False)[0].tolist()
    theirs = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    assert ours == theirs and theirs[-1] == end and len(theirs) < 12  # one answer, then the stop, in both
    # the same on a whole question set, through `alignlm export --check` (lmms-eval's way of asking)
    args = ["export", str(final), str(tmp_path / "hf2"), "--check", str(colour_set["test"]), "--max-new-tokens", "12"]
    assert main(args) == 0
    check = json.loads((tmp_path / "hf2" / "export_check.json").read_text())
    assert check["n"] == 12 and check["same_answers"] == 12 and check["differences"] == []
    assert check["export_accuracy"] == check["alignlm_accuracy"]


def test_export_check_fails_when_an_answer_differs(tmp_path, monkeypatch, capsys):
    """`alignlm export --check` exits 1 and names the differing answers when the export answers otherwise."""
    import alignlm.commands.export as command

    differ = {"id": "q1", "alignlm": "red", "export": "redredred", "answer": "red"}
    result = {
        "set": "s.json",
        "n": 2,
        "same_answers": 1,
        "max_new_tokens": 8,
        "alignlm_accuracy": 1.0,
        "export_accuracy": 0.5,
    }
    monkeypatch.setattr(command, "export", lambda *a: tmp_path)
    monkeypatch.setattr(command, "compare_with_export", lambda *a: {**result, "differences": [differ]})
    (tmp_path / "s.json").write_text("[]")
    assert main(["export", "ckpt", str(tmp_path), "--check", str(tmp_path / "s.json")]) == 1
    out = capsys.readouterr().out
    assert "1 of 2 answers identical" in out and "redredred" in out and "exported folder" in out
    assert json.loads((tmp_path / "export_check.json").read_text())["differences"] == [differ]


@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "chat"])
def test_exported_processor_prompts_as_training_with_a_tokenizer_that_adds_bos(tiny_model, tmp_path, template):
    """Llama/Vicuna tokenizers add BOS themselves: a chat template that also wrote it as text gave the exported
    model two (processor(text=...) adds one more). The processor pads left, for batched generation, and a record
    that writes its image after the question is prompted as trained (images first)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoProcessor

    from alignlm.export.hf_llava import llava_processor

    model = tiny_model()
    tok = model.tokenizer
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    hf = to_llava(model)
    llava_processor(model, get_template(template), hf.config.vision_feature_select_strategy).save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert processor.tokenizer.padding_side == "left"
    size = model.image_spec.size
    assert processor.image_processor.crop_size == {"height": size, "width": size}  # its token-count API reads it
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    ids = _inputs(processor, image)["input_ids"][0].tolist()
    assert ids[:2].count(tok.bos_token_id) == 1 and ids == _prompt_ids(model, template)
    late = [{"from": "human", "value": "What color is it?\n<image>"}]
    if template != "plain":
        rendered = get_template(template).render(to_turns(late), tok, add_generation_prompt=True)
        assert rendered.text == processor.apply_chat_template(
            [{"role": "user", "content": late[0]["value"]}], add_generation_prompt=True
        )
        assert IMAGE_TOKEN + "\nWhat color" in rendered.text


def test_a_tower_whose_registers_are_dropped_but_cls_kept_is_not_exported(tiny_model):
    """Llava keeps every prefix token or drops exactly one: CLS kept with registers dropped computed otherwise."""
    from alignlm.export.hf_llava import feature_strategy
    from alignlm.models.vision import HFVisionTower

    tower = HFVisionTower(
        config=dict(
            model_type="dinov2_with_registers", hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, image_size=32, patch_size=8, num_register_tokens=4,
        ),
        select_feature="cls_patch",
    )  # fmt: skip
    with pytest.raises(ExportError, match="4 register tokens are dropped"):
        feature_strategy(tower)


def _llava_folder(model, folder, **config):
    """``model`` saved as a Llava folder (processor included), with ``config`` fields of config.json overwritten."""
    from alignlm.export.hf_llava import llava_processor

    hf = to_llava(model)
    hf.save_pretrained(folder)
    llava_processor(model, get_template("vicuna_v1"), hf.config.vision_feature_select_strategy).save_pretrained(folder)
    if config:
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **config}))
    return folder


def test_a_llava_folder_is_imported_with_its_image_statistics_or_refused_naming_what_differs(
    tiny_model, tmp_path, caplog
):
    """transformers 5 writes the image processor into processor_config.json, which import did not read (a SigLIP
    folder came in normalised with CLIP's mean); a projector activation, a list of feature layers or a strategy that
    drops the first token of a tower without CLS computed something else, or failed with a raw error."""
    from alignlm.config import ConfigError
    from alignlm.export.hf_llava import vision_from_llava

    folder = _llava_folder(tiny_model(), tmp_path / "a")
    processor = json.loads((folder / "processor_config.json").read_text())
    processor["image_processor"].update(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    (folder / "processor_config.json").write_text(json.dumps(processor))
    spec = vision_from_llava(str(folder)).image_spec
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.25, 0.25)
    processor["image_processor"].update(do_pad=False, do_center_crop=True)  # as llava-1.5-hf's CLIPImageProcessor
    (folder / "processor_config.json").write_text(json.dumps(processor))
    with caplog.at_level("WARNING", logger="alignlm"):
        vision_from_llava(str(folder))
    assert "crops the centre; alignlm makes a stage's images square by its data.image_aspect_ratio" in caplog.text
    for field, value, match in (
        ("projector_hidden_act", "silu", "projector_hidden_act='silu'"),
        ("vision_feature_layer", [-3, -2], r"vision_feature_layer=\[-3, -2\]"),
    ):
        _llava_folder(tiny_model(), tmp_path / field, **{field: value})
        with pytest.raises(ConfigError, match=match):
            build_model(compose("model=llava_hf", f"model.path={tmp_path / field}").model)
    siglip = _llava_folder(tiny_model(*SIGLIP), tmp_path / "siglip", vision_feature_select_strategy="default")
    with pytest.raises(ConfigError, match="drops the first token of a siglip_vision_model tower, which has no class"):
        vision_from_llava(str(siglip))
    with pytest.raises(ConfigError, match="is not a transformers Llava folder"):
        vision_from_llava(str(tmp_path))


def test_a_llava_folder_holding_nan_weights_is_refused_naming_the_tensor(tiny_model, tmp_path):
    """init_from a Llava folder loaded NaN weights, where a final/ refuses them."""
    folder = _llava_folder(tiny_model(), tmp_path / "a")
    weights = load_file(str(folder / "model.safetensors"))
    name = next(k for k in sorted(weights) if "linear_1.weight" in k)
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    target = tiny_model()
    before = target.connector.proj[0].weight.clone()
    with pytest.raises(ValueError, match=rf"hold NaN: \['[\w.]*{re.escape(name)}'\] \(1 tensors of the Llava folder"):
        load_llava_weights(target, folder)
    assert torch.equal(target.connector.proj[0].weight, before)


def test_a_llava_folders_image_statistics_are_three_finite_numbers_or_refused_naming_the_field(tiny_model, tmp_path):
    """An image std of 0 in the folder's image processor made every pixel inf; a mean of one number or of strings
    failed only once training read an image."""
    from alignlm.config import ConfigError
    from alignlm.export.hf_llava import vision_from_llava

    folder = _llava_folder(tiny_model(), tmp_path / "a")
    processor = json.loads((folder / "processor_config.json").read_text())
    for field, value in (
        ("image_std", [0.0, 0.0, 0.0]),
        ("image_std", [0.25, float("nan"), 0.25]),
        ("image_mean", [0.5]),
        ("image_mean", ["0.5", "0.5", "0.5"]),
    ):
        image = {**processor["image_processor"], field: value}
        (folder / "processor_config.json").write_text(json.dumps({**processor, "image_processor": image}))
        with pytest.raises(ConfigError, match=re.escape(f"processor_config.json: image_processor.{field}={value!r}")):
            vision_from_llava(str(folder))


def test_export_never_writes_over_its_checkpoint_or_another_folder(colour_set, tmp_path, capsys):
    """`alignlm export FINAL FINAL` wrote Llava's weights over alignlm's; a re-export keeps nothing of the old one."""
    final = _train(colour_set, tmp_path)
    before = (final / "model.safetensors").read_bytes()
    for out in (final, final / "hf", final.parent):
        assert main(["export", str(final), str(out)]) == 2
        assert "overlaps the checkpoint" in capsys.readouterr().err or out == final
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert main(["export", str(final), str(other)]) == 2 and (other / "mine.txt").exists()
    assert (final / "model.safetensors").read_bytes() == before
    out = tmp_path / "hf"
    assert main(["export", str(final), str(out)]) == 0
    (out / "export_check.json").write_text("{}")  # a verdict about earlier weights
    assert main(["export", str(final), str(out)]) == 0 and not (out / "export_check.json").exists()
    assert not list(tmp_path.glob(".hf.tmp*"))
    for flags in (["--check", str(tmp_path / "none.json")], ["--check", str(colour_set["test"]), "--limit", "0"]):
        assert main(["export", str(final), str(tmp_path / "hf3"), *flags]) == 2
        assert not (tmp_path / "hf3").exists()


def _saved_final(cfg, stage: str):
    """A ``final/`` folder of ``stage`` under ``cfg``'s run, written as training writes one (no training)."""
    from alignlm.models.io import config_yaml
    from alignlm.training.checkpoint import save_final

    final = Path(cfg.output_dir) / cfg.run_name / stage / "final"
    save_final(final, build_model(cfg.model), config_yaml(cfg), ["connector", "llm"], stage)
    return final


def test_an_earlier_stages_final_exports_with_that_stages_template_and_card(colour_set, tmp_path):
    """A two-stage run's pretrain final/ (trained with plain) was exported with the finetune stage's template and
    stop, so `export --check` failed where `alignlm eval` prompts it with its own stage's; its model card listed the
    later stage and the run's evaluation, which is of the later stage's checkpoint."""
    from transformers import AutoProcessor

    cfg = compose(*tiny_overrides(colour_set, tmp_path))
    assert (cfg.stages.pretrain.data.template, cfg.stages.finetune.data.template) == ("plain", "vicuna_v1")
    evals = {"eval": {"colours": {"n": 12, "accuracy": 0.5, "chance": 0.25}}}
    (tmp_path / "t" / "summary.json").parent.mkdir(parents=True)
    (tmp_path / "t" / "summary.json").write_text(json.dumps(evals))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    for stage, prompt, card_rows in (
        ("pretrain", IMAGE_TOKEN, ["| pretrain |"]),
        ("finetune", "USER: " + IMAGE_TOKEN, ["| pretrain |", "| finetune |", "## Evaluation", "| colours | 12 |"]),
    ):
        out = export(_saved_final(cfg, stage), tmp_path / f"hf_{stage}")
        rendered = AutoProcessor.from_pretrained(out).apply_chat_template(messages, add_generation_prompt=True)
        assert prompt in rendered and (stage == "finetune") == ("USER" in rendered), rendered
        card = (out / "README.md").read_text()
        assert all(row in card for row in card_rows), card
        assert ("| finetune |" in card, "## Evaluation" in card) == ((stage == "finetune",) * 2)


def test_an_exported_chat_template_that_writes_bos_gives_one_bos_as_training(tiny_model, tmp_path):
    """A chat template that writes ``bos_token`` itself (Llama-3, Mistral, Gemma) on a tokenizer that adds BOS too:
    training starts with one BOS, the exported processor gave two (the text's, and the tokenizer's)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoProcessor

    from alignlm.export.hf_llava import llava_processor

    model = tiny_model()
    tok = model.tokenizer
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith("<s>")
    hf = to_llava(model)
    llava_processor(model, get_template("chat"), hf.config.vision_feature_select_strategy).save_pretrained(tmp_path)
    ids = _inputs(AutoProcessor.from_pretrained(tmp_path), Image.new("RGB", (40, 30), (200, 40, 40)))["input_ids"]
    assert ids[0].tolist().count(tok.bos_token_id) == 1 and ids[0].tolist() == _prompt_ids(model, "chat")


def test_a_llava_folder_whose_weights_miss_exceed_or_misfit_its_config_is_refused_naming_it(tiny_model, tmp_path):
    """init_from a Llava folder loaded a missing weight as random values and passed over a weight with no place;
    a weight of another shape stopped with transformers' generic message, naming neither the folder nor the file."""
    folder = _llava_folder(tiny_model(), tmp_path / "a")
    weights = load_file(str(folder / "model.safetensors"))
    name = next(k for k in sorted(weights) if "linear_1.weight" in k)
    rows, cols = weights[name].shape
    for edit, match in (
        (lambda w: w.pop(name), r"lacks the weights \['[\w.]*linear_1.weight'\]"),
        (lambda w: w.update(extra=torch.zeros(3)), r"holds weights the model has no place for \['extra'\]"),
        (
            lambda w: w.update({name: w[name][:, :-1].contiguous()}),
            rf"linear_1.weight has shape \[{rows}, {cols - 1}\] where its config.json makes \[{rows}, {cols}\]",
        ),
    ):
        edited = dict(weights)
        edit(edited)
        save_file(edited, str(folder / "model.safetensors"), metadata={"format": "pt"})
        target = tiny_model()
        before = target.connector.proj[0].weight.clone()
        with pytest.raises(ValueError, match=rf"init_from={re.escape(str(folder))}: .*{match}"):
            load_llava_weights(target, folder)
        assert torch.equal(target.connector.proj[0].weight, before)


DINO_REGISTERS = [
    "model.vision.config.model_type=dinov2_with_registers",
    "+model.vision.config.num_register_tokens=4",
    "~model.vision.config.intermediate_size",  # DINOv2 sizes its MLP by mlp_ratio
    "model.vision.select_feature=cls_patch",
]


def test_a_tower_with_registers_kept_exports_and_imports_back(tiny_model, tmp_path):
    """An export of a DINOv2-with-registers tower (registers=keep, cls_patch: Llava's "full") came back with the
    registers dropped, and import refused it, advising registers=keep, which model=llava_hf cannot set."""
    from alignlm.export.hf_llava import feature_strategy
    from alignlm.models.vision import HFVisionTower

    model = tiny_model(*DINO_REGISTERS, "+model.vision.registers=keep")
    folder = _llava_folder(model, tmp_path / "a")
    back = build_model(compose("model=llava_hf", f"model.path={folder}").model)
    load_llava_weights(back, folder)
    assert back.num_image_tokens == model.num_image_tokens
    ours = model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in back.state_dict().items())
    # select_feature=patch drops CLS and registers; the advice to keep them names both switches it needs
    config = {**dict(compose(*DINO_REGISTERS).model.vision.config), "hidden_size": 32}
    with pytest.raises(
        ExportError, match=r"5 prefix tokens \(CLS and 4 registers\).*cls_patch with model.vision.registers=keep"
    ):
        feature_strategy(HFVisionTower(config=config, select_feature="patch"))


def test_a_final_without_its_parts_metadata_is_refused_not_loaded_in_part(tiny_model, tmp_path):
    """A final/ re-saved without the `parts` metadata skipped the check that every weight of its parts is there,
    and loaded what it held over the built model's weights; a part the metadata leaves out is checked too."""
    from safetensors import safe_open

    cfg = compose("model=tiny", f"output_dir={tmp_path}", "run_name=t")
    final = _saved_final(cfg, "finetune")
    weights = final / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert f.metadata() == {"parts": "connector,llm", "stage": "finetune"}
    load_model(final)  # as written
    state = load_file(str(weights))
    half = {k: v for k, v in state.items() if "layers.1." not in k}
    save_file(half, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} has no 'parts' metadata"):
        load_model(final)
    save_file(half, str(weights), metadata={"parts": "connector"})
    with pytest.raises(KeyError, match=r"lacks weights for \['llm.model.layers.1."):
        load_model(final)


def test_a_convolutional_hf_tower_is_refused_with_the_reason(tiny_model):
    """A ConvNeXt tower (its config has a patch_size) was refused for "16 prefix tokens (registers?)", or failed with
    an AttributeError on its config's hidden_size, depending on the layer."""
    from alignlm.models.connectors.mlp import MLPConnector
    from alignlm.models.mllm import AlignLM
    from alignlm.models.vision import HFVisionTower

    base = tiny_model()
    config = {"model_type": "convnext", "image_size": 32, "patch_size": 4, "hidden_sizes": [8, 16, 32, 80],
              "depths": [1, 1, 1, 1]}  # fmt: skip
    for layer in (-1, -2):
        tower = HFVisionTower(config=config, select_layer=layer)
        model = AlignLM(tower, MLPConnector(tower.hidden_size, base.llm.config.hidden_size), base.llm, base.tokenizer)
        with pytest.raises(ExportError, match=rf"'convnext' is convolutional: its layer {layer} \(model.vision.select"):
            to_llava(model)


@pytest.mark.parametrize(
    "key,value,shown",
    [
        ("final_logit_softcapping", 30.0, "scale 1, soft-cap 30.0"),
        ("logits_scaling", 8.0, "scale 0.125, soft-cap None"),
    ],
)
def test_an_llm_that_transforms_its_heads_logits_is_not_exported(tiny_model, key, value, shown):
    """Gemma-2's soft cap (Granite's logits_scaling, Cohere's logit_scale) is applied by alignlm and dropped by
    transformers' Llava, whose logits are lm_head's output: the export scored and sampled otherwise."""
    model = tiny_model()
    setattr(model.llm.config, key, value)
    with pytest.raises(ExportError, match=rf"transforms its head's logits \({shown}, from its config\)"):
        to_llava(model)


def test_export_refuses_a_symlinked_output_and_leaves_no_temporary_folder(colour_set, tmp_path, capsys, monkeypatch):
    """`export FINAL latest`, where latest links to an earlier export, crashed in rmtree and left its temporary folder
    behind; an export that fails while writing leaves nothing either."""
    import alignlm.export.hf_llava as hf_llava

    final = _saved_final(compose(*tiny_overrides(colour_set, tmp_path)), "finetune")
    real, link = tmp_path / "run3", tmp_path / "latest"
    assert main(["export", str(final), str(real)]) == 0
    link.symlink_to(real)
    before = (real / "model.safetensors").read_bytes()
    assert main(["export", str(final), str(link)]) == 2
    assert f"the output {link} is a symbolic link (to {real})" in capsys.readouterr().err
    assert (real / "model.safetensors").read_bytes() == before and link.is_symlink()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(hf_llava, "model_card", fail)
    with pytest.raises(OSError, match="disk full"):
        export(final, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_subclass_of_the_hf_tower_is_refused_naming_the_class(tiny_model):
    """A plug-in tower averaging two hidden layers passed the isinstance check and exported with exit 0: Llava's
    tower computes one layer's features, so the export answered with features 28 % away from the trained model's."""
    from alignlm.models.mllm import AlignLM
    from alignlm.models.vision import HFVisionTower

    class TwoLayerMean(HFVisionTower):
        def _hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
            hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
            return 0.5 * (hidden[self.select_layer] + hidden[-3])

    base = tiny_model()
    tower = TwoLayerMean(config=base.vision.model.config.to_dict(), select_layer=base.vision.select_layer)
    model = AlignLM(tower, base.connector, base.llm, base.tokenizer)
    with pytest.raises(ExportError, match=r"TwoLayerMean is a subclass of HFVisionTower.*HFVisionTower itself"):
        to_llava(model)


def test_export_check_answers_both_sides_on_the_asked_device(tiny_model, tmp_path, monkeypatch, capsys):
    """`export --check` rebuilt the checkpoint and loaded the export on the CPU whatever the machine had: both sides
    now answer on ``--device`` (by default eval's), one device for both, and a device this machine cannot use is
    refused naming the flag, before anything is exported."""
    import alignlm.commands.export as command
    from alignlm.evaluation import export_check

    seen, record = {}, {"id": "q1", "answer": "red"}
    monkeypatch.setattr(export_check, "resolve", lambda paths: ["ck"])
    monkeypatch.setattr(export_check, "load", lambda ck, *a: tiny_model().eval())
    monkeypatch.setattr(export_check, "stage_config", lambda ck: None)
    monkeypatch.setattr(export_check, "data_config", lambda ck, cfg: {})
    monkeypatch.setattr(
        export_check,
        "generate_set",
        lambda model, *a, **k: seen.update(alignlm=next(model.parameters()).device) or [("q1", "red", record)],
    )
    monkeypatch.setattr(
        export_check,
        "exported_answers",
        lambda out, records, root, n, device, reading: seen.update(export=device) or ["red"],
    )
    exported = []
    monkeypatch.setattr(command, "export", lambda *a: exported.append(a) or tmp_path)
    monkeypatch.setattr(command, "default_device", lambda: "meta")  # stands in for the GPU eval would take
    (tmp_path / "s.json").write_text("[]")
    args = ["export", "ckpt", str(tmp_path), "--check", str(tmp_path / "s.json")]
    assert main(args) == 0 and seen == {"alignlm": torch.device("meta"), "export": torch.device("meta")}
    assert main([*args, "--device", "cpu"]) == 0 and seen == {
        "alignlm": torch.device("cpu"),
        "export": torch.device("cpu"),
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exported.clear()
    with pytest.raises(SystemExit):
        main([*args, "--device", "cuda:0"])
    assert "argument --device: 'cuda:0': this machine has no CUDA device" in capsys.readouterr().err and exported == []


def test_a_bfloat16_model_is_exported_in_bfloat16_with_its_weights_and_config_saying_so(tiny_model, tmp_path):
    """Built in the LLM's dtype, not in float32 and cast (which had held twice its size at once and left its config's
    dtype unset): the model, its config and the folder's config.json name the dtype its weights have."""
    model = tiny_model().to(torch.bfloat16)
    hf = to_llava(model)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    assert hf.config.dtype == hf.config.text_config.dtype == torch.bfloat16
    assert torch.equal(hf.lm_head.weight, model.llm.get_output_embeddings().weight)
    hf.save_pretrained(tmp_path / "llava")
    assert json.loads((tmp_path / "llava" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_llava_folder_whose_config_disagrees_with_the_model_is_refused_and_an_export_counts_its_tokens(
    tiny_model, tmp_path
):
    """The weights fit whatever the folder's image token or feature layer says: without the comparison a model had
    answered with another image token or layer, silently. The exported config's ``image_seq_length`` (serving tools
    size an image's placeholder by it) is the model's count, not LLaVA-1.5's 576."""
    from alignlm.export.hf_llava import load_llava_weights, to_llava

    model = tiny_model()
    load_llava_weights(model, _llava_folder(model, tmp_path / "good"))  # its own export loads
    layer = model.vision.select_layer
    for field, value in (("image_token_index", model.image_token_id - 1), ("vision_feature_layer", layer - 1)):
        bad = _llava_folder(model, tmp_path / field, **{field: value})
        with pytest.raises(ValueError, match="the Llava config disagrees with model config"):
            load_llava_weights(model, bad)
    config = to_llava(model).config
    assert (config.image_seq_length, config.image_token_index) == (model.num_image_tokens, model.image_token_id)


def test_the_export_pads_generation_with_the_tokenizers_pad_token(tiny_model):
    """The exported generation_config pads with the tokenizer's pad token (batched generation in transformers), not
    with EOS, which the export sets apart as the stop token."""
    from alignlm.data.templates import get_template
    from alignlm.export.hf_llava import set_stop_tokens, to_llava

    model = tiny_model()
    tok = model.tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    hf = to_llava(model)
    set_stop_tokens(hf, tok, get_template("chat"))
    assert hf.generation_config.pad_token_id == tok.pad_token_id


def test_the_exported_processor_prompts_with_model_llm_chat_template(tiny_model, tmp_path):
    """``model.llm.chat_template`` replaces the tokenizer's template in training; the exported processor prompts with
    the same one (the roles in capitals here, a template no tokenizer of the tests has), so transformers' users see
    the prompt the model was trained on."""
    from transformers import AutoProcessor

    from alignlm.export.hf_llava import llava_processor
    from tests.test_templates import UPPER_ROLES

    upper = tmp_path / "upper.jinja"
    upper.write_text(UPPER_ROLES)
    model = tiny_model(f"model.llm.chat_template={upper}")
    hf = to_llava(model)
    llava_processor(model, get_template("chat"), hf.config.vision_feature_select_strategy).save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    ids = _inputs(processor, Image.new("RGB", (40, 30), (200, 40, 40)))["input_ids"][0].tolist()
    assert ids == _prompt_ids(model, "chat")
    assert "<|im_start|>ASSISTANT\n" in model.tokenizer.decode(ids)
