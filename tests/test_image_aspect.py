"""How a non-square image becomes the tower's square (``data.image_aspect_ratio``), as LLaVA-1.5 does per stage:
pretraining (pretrain.sh, the default 'square') runs CLIP's image processor alone, a shorter-side resize and a centre
crop; instruction tuning (finetune.sh, ``--image_aspect_ratio pad``) pads with the mean colour first. Everything that
preprocesses for a stage's checkpoint follows its setting. And a tower normalises as the image processor saved with its
checkpoint does, as LLaVA builds its processor from the tower's folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignlm.data.images import ImageSpec, preprocess
from alignlm.data.records import IMAGE_TOO_LARGE
from tests.conftest import compose, tiny_overrides

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# (width, height): landscape, portrait, odd sides, nearly square, square, thin strips both ways
SHAPES = [(500, 375), (375, 500), (333, 97), (97, 333), (41, 40), (336, 336), (1, 9), (601, 17)]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of random pixels: every resampling or offset error shows."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def clip_processor(side: int, mean=CLIP_MEAN, std=CLIP_STD):
    """transformers' CLIP image processor as LLaVA-1.5's tower (openai/clip-vit-large-patch14-336) configures it,
    built offline from its settings; its PIL implementation, which LLaVA used (transformers 5's default one needs
    torchvision and resizes with other kernels)."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(
        do_resize=True,
        size={"shortest_edge": side},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": side, "width": side},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
    )


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square`` (llava/mm_utils.py), as its train.py calls it under ``--image_aspect_ratio pad``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, 0) if height > width else (0, (side - height) // 2))
    return result


def llava_pixels(image: Image.Image, side: int, aspect_ratio: str) -> torch.Tensor:
    """LLaVA-1.5's pixels of an image: the processor alone ('square', pretraining), or after expand2square with the
    processor's mean colour ('pad', instruction tuning)."""
    processor = clip_processor(side)
    if aspect_ratio == "pad":
        image = expand2square(image, tuple(int(m * 255) for m in CLIP_MEAN))
    return torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])


def caption_file(root: Path, *shapes: tuple[int, int]) -> Path:
    """Caption records, one per noise image of each ``(width, height)``."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (width, height) in enumerate(shapes):
        noise(width, height, seed=i).save(root / f"{i}.png")
        records.append(
            {
                "id": f"c{i}",
                "image": f"{i}.png",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red square."}],
            }
        )
    path = root / "captions.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def model():
    from alignlm.models.build import build_model

    return build_model(compose().model)


@pytest.mark.parametrize("side", [32, 336])
def test_crop_gives_llavas_pretraining_pixels_and_pad_its_finetuning_pixels(side):
    """``crop`` is CLIP's image processor step for step (shorter side resized, bicubic, the centre cut out, the corner
    rounded down; LLaVA-1.5's pretraining); ``pad`` is LLaVA's expand2square and then that processor. The old squash
    to a square (``pad=False``) was neither."""
    spec = ImageSpec(side, CLIP_MEAN, CLIP_STD)
    for width, height in SHAPES:
        image = noise(width, height)
        for aspect_ratio in ("crop", "pad"):
            torch.testing.assert_close(
                preprocess(image, spec, aspect_ratio),
                llava_pixels(image, side, aspect_ratio),
                atol=1e-5,
                rtol=0,
                msg=lambda m, a=aspect_ratio, w=width, h=height: f"{a} {w}x{h}: {m}",
            )


def test_an_unknown_aspect_ratio_is_refused_naming_its_key(model, tmp_path):
    """LLaVA's own word for its default, 'square', is not one of alignlm's: refused before a record is read, naming
    the key and both choices, not trained with one of them."""
    from alignlm.config import ConfigError
    from alignlm.data.build import build_dataset

    data = {"sources": [{"path": str(caption_file(tmp_path, (40, 30)))}], "image_aspect_ratio": "square"}
    with pytest.raises(ConfigError, match=r"data.image_aspect_ratio='square' is not known; choose pad .* or crop"):
        build_dataset(data, model, seed=0)
    with pytest.raises(ConfigError, match="image_aspect_ratio=None is not known"):
        preprocess(noise(4, 3), model.image_spec, None)


def test_llava15_stages_crop_to_pretrain_and_pad_to_finetune(model, tmp_path):
    """The stage files: pretraining crops (pretrain.sh passes no --image_aspect_ratio), finetuning and the DPO stage
    built on it pad (finetune.sh); each stage's dataset gives LLaVA's pixels of that stage."""
    from omegaconf import OmegaConf

    from alignlm.data.build import build_dataset

    cfg = compose("+stage@stages.dpo=dpo")
    stages = ("pretrain", "finetune", "dpo")
    assert [cfg.stages[s].data.image_aspect_ratio for s in stages] == ["crop", "pad", "pad"]
    path = caption_file(tmp_path, (45, 30), (30, 45))
    side = model.image_spec.size
    for stage in ("pretrain", "finetune"):
        data = OmegaConf.to_container(cfg.stages[stage].data, resolve=True)
        dataset = build_dataset({**data, "template": "plain", "sources": [{"path": str(path)}]}, model, seed=0)
        for i, shape in enumerate([(45, 30), (30, 45)]):
            expected = llava_pixels(noise(*shape, seed=i), side, "square" if stage == "pretrain" else "pad")
            torch.testing.assert_close(dataset[i]["pixel_values"][0], expected, atol=1e-5, rtol=0)


def test_a_thin_strip_is_refused_before_the_crop_resizes_it(model, tmp_path):
    """Resized to the tower's size on its shorter side, a thin strip is large (1 x 7000 at 336 px: 800 M pixels, GBs
    for a few-KB file); one over data.max_image_pixels is skipped and counted as too large, as a padded one is."""
    from alignlm.data.build import build_dataset
    from alignlm.data.collate import Skipped

    path = caption_file(tmp_path, (2, 30))  # padded: 30 x 30 = 900 pixels; resized for the crop: 32 x 480
    data = {"sources": [{"path": str(path)}], "max_image_pixels": 1000}
    assert not isinstance(build_dataset({**data, "image_aspect_ratio": "pad"}, model, seed=0)[0], Skipped)
    skipped = build_dataset({**data, "image_aspect_ratio": "crop"}, model, seed=0)[0]
    assert isinstance(skipped, Skipped) and skipped.cause == "image over data.max_image_pixels"
    assert "resized to 32x480 before its centre crop" in skipped.reason and "15360 pixels" in skipped.reason


def test_a_tall_image_is_bounded_by_its_own_pixels_under_crop_not_by_a_padded_square(model, tmp_path):
    """Nothing pads an image under crop, but its padded square was checked against data.max_image_pixels: every image
    longer than about 7071 px on a side (a tall screenshot, a panorama) was skipped as too large at the default limit,
    with the feature cache too. Under crop an image counts by its own pixels (and by its resize before the crop)."""
    from accelerate import Accelerator

    from alignlm.data.build import build_dataset
    from alignlm.data.collate import Skipped
    from alignlm.training.feature_cache import attach_feature_cache

    path = caption_file(tmp_path, (12, 120))  # 1440 pixels; padded 14400; resized for the crop 32 x 320 = 10240
    data = {"sources": [{"path": str(path)}], "max_image_pixels": 12000, "template": "plain"}
    padded = build_dataset({**data, "image_aspect_ratio": "pad"}, model, seed=0)[0]
    assert isinstance(padded, Skipped) and "padded to a square 14400" in padded.reason
    cropped = build_dataset({**data, "image_aspect_ratio": "crop"}, model, seed=0)
    live = cropped[0]["pixel_values"]
    model.frozen_parts.add("vision")
    attach_feature_cache(model, cropped, True, tmp_path / "cache", compose().model.vision, Accelerator(cpu=True))
    assert live.shape[-1] == model.image_spec.size and "image_embeds" in cropped[0]  # served from the cache


def test_eval_prompts_a_checkpoint_with_its_stages_pixels_and_an_older_one_padded(model, tmp_path):
    """``alignlm eval`` and ``export --check`` build their prompts from the checkpoint's stage data node: a cropping
    stage's checkpoint sees cropped images; a checkpoint's config saved before the setting existed has none, and was
    trained on padded images, so it is read as ``pad``, not as the pretraining stage's new ``crop``."""
    from alignlm.models.generation import prompt_batches

    path = caption_file(tmp_path, (45, 30))
    side = model.image_spec.size
    for data, aspect_ratio in (
        ({"template": "plain", "image_aspect_ratio": "crop"}, "square"),
        ({"template": "plain", "image_aspect_ratio": "pad"}, "pad"),
        ({"template": "plain"}, "pad"),  # an older checkpoint's config
    ):
        ((inputs, _),) = prompt_batches(model, str(path), data)
        expected = llava_pixels(noise(45, 30), side, aspect_ratio)
        torch.testing.assert_close(
            inputs["pixel_values"][0], expected, atol=1e-5, rtol=0, msg=lambda m, d=data: f"{d}: {m}"
        )


def test_a_feature_cache_of_padded_images_is_never_served_to_a_stage_that_crops(model, tmp_path):
    """The cache's key had the tower and its image spec but not how the stage made images square: a cropping stage
    read the features of padded images that another stage of the same tower had cached. Padding adds nothing to the
    key, so the caches filled before the setting stay valid."""
    from accelerate import Accelerator

    from alignlm.data.images import load_rgb
    from alignlm.data.llava import LlavaDataset
    from alignlm.data.records import Source
    from alignlm.data.templates import get_template
    from alignlm.training.feature_cache import attach_feature_cache, tower_fingerprint

    vision_cfg = compose().model.vision
    prints = {a: tower_fingerprint(model, vision_cfg, a) for a in ("pad", "crop")}
    assert prints["crop"] != prints["pad"] == tower_fingerprint(model, vision_cfg)
    path = caption_file(tmp_path / "data", (45, 30))
    model.frozen_parts.add("vision")
    acc = Accelerator(cpu=True)
    for aspect_ratio in ("pad", "crop"):
        dataset = LlavaDataset(
            [Source(str(path))],
            model.tokenizer,
            get_template("plain"),
            model.image_spec,
            model.num_image_tokens,
            image_aspect_ratio=aspect_ratio,
        )
        attach_feature_cache(model, dataset, True, tmp_path / "cache", vision_cfg, acc)
        pixels = preprocess(load_rgb(tmp_path / "data" / "0.png"), model.image_spec, aspect_ratio)
        with torch.no_grad():
            live = model.vision.eval()(pixels[None])[0]
        torch.testing.assert_close(dataset[0]["image_embeds"][0], live)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(prints.values())


def _saved_final(cfg, stage: str) -> Path:
    """A ``final/`` folder of ``stage`` under ``cfg``'s run, written as training writes one (no training)."""
    from alignlm.models.build import build_model
    from alignlm.models.io import config_yaml
    from alignlm.training.checkpoint import save_final

    final = Path(cfg.output_dir) / cfg.run_name / stage / "final"
    torch.manual_seed(0)
    save_final(final, build_model(cfg.model), config_yaml(cfg), ["connector", "llm"], stage)
    return final


def test_an_export_preprocesses_as_its_stage_did_and_its_check_agrees(model, colour_set, tmp_path):
    """The exported processor padded whatever the stage did: a pretraining checkpoint's export saw other pixels than
    it trained on. Now a cropping stage's export resizes and crops (the processor's own steps), a padding stage's
    pads, a checkpoint saved before the setting pads, and ``export --check`` agrees on images of every shape."""
    from omegaconf import OmegaConf
    from transformers import AutoProcessor

    from alignlm.commands import main
    from alignlm.export.hf_llava import export
    from alignlm.models.io import final_image_reading

    image = noise(45, 30)
    cfg = compose(*tiny_overrides(colour_set, tmp_path))
    old = compose(*tiny_overrides(colour_set, tmp_path / "old"))
    OmegaConf.set_struct(old, False)
    old.stages.pretrain.data.pop("image_aspect_ratio", None)  # a run from before the setting
    for run, stage, llava in ((cfg, "pretrain", "square"), (cfg, "finetune", "pad"), (old, "pretrain", "pad")):
        final = _saved_final(run, stage)
        # what token-word accuracy and V2L's words read images with (they padded a cropping stage's checkpoint)
        assert final_image_reading(final).aspect_ratio == ("crop" if llava == "square" else "pad")
        out = export(final, Path(run.output_dir) / f"hf_{stage}")
        pixels = AutoProcessor.from_pretrained(out).image_processor(image, return_tensors="pt")["pixel_values"][0]
        expected = llava_pixels(image, model.image_spec.size, llava)
        torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0, msg=lambda m, s=stage: f"{s}: {m}")
    questions = tmp_path / "questions"
    # a 300 x 8000 strip, which a cropping stage reads (2.4 M pixels): the export's side had refused its padded square
    caption_file(questions, (45, 30), (30, 45), (13, 50), (32, 32), (300, 8000))
    records = json.loads((questions / "captions.json").read_text())
    for rec in records:
        rec["conversations"] = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}]
        rec["answer"] = "red"
    (questions / "set.json").write_text(json.dumps(records))
    final = Path(cfg.output_dir) / "t" / "pretrain" / "final"
    args = ["export", str(final), str(tmp_path / "hf_check"), "--check", str(questions / "set.json")]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    check = json.loads((tmp_path / "hf_check" / "export_check.json").read_text())
    assert check["n"] == 5 and check["same_answers"] == 5, check


def _siglip_folder(path: Path) -> Path:
    """A tiny random SigLIP vision checkpoint, saved offline."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    SiglipVisionModel(config).save_pretrained(path)
    return path


def _processor_config(mean, std) -> dict:
    return {
        "image_processor_type": "SiglipImageProcessor",
        "image_mean": mean,
        "image_std": std,
        "size": {"height": 32, "width": 32},
        "resample": 3,
        "do_normalize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
    }


def test_a_tower_normalises_as_the_image_processor_saved_with_its_checkpoint(tmp_path, caplog):
    """LLaVA builds its image processor from the tower's checkpoint; alignlm read only its config.json and normalised
    a SigLIP tower (mean and std 0.5) with OpenAI CLIP's statistics unless the YAML repeated them. Now: the YAML's,
    else the checkpoint's saved processor (``processor_config.json``'s ``image_processor`` first, as transformers
    reads them), else CLIP's, said in the log; a saved std of 0 is refused naming the file."""
    from alignlm.config import ConfigError
    from alignlm.models.vision import HFVisionTower

    folder = _siglip_folder(tmp_path / "siglip")
    (folder / "preprocessor_config.json").write_text(json.dumps(_processor_config([0.5] * 3, [0.5] * 3)))
    spec = HFVisionTower(name_or_path=str(folder)).image_spec
    assert (spec.mean, spec.std) == ((0.5,) * 3, (0.5,) * 3)
    spec = HFVisionTower(name_or_path=str(folder), image_mean=[0.1, 0.2, 0.3]).image_spec  # the YAML's first
    assert (spec.mean, spec.std) == ((0.1, 0.2, 0.3), (0.5,) * 3)
    (folder / "processor_config.json").write_text(
        json.dumps({"image_processor": _processor_config([0.25] * 3, [2] * 3)})
    )
    spec = HFVisionTower(name_or_path=str(folder)).image_spec
    assert (spec.mean, spec.std) == ((0.25,) * 3, (2.0,) * 3)
    (folder / "processor_config.json").unlink()
    (folder / "preprocessor_config.json").write_text(json.dumps(_processor_config([0.5] * 3, [0.5, 0.5, 0])))
    with pytest.raises(ConfigError, match=r"preprocessor_config.json: image_std=\[0.5, 0.5, 0\]: .* each above 0"):
        HFVisionTower(name_or_path=str(folder))
    (folder / "preprocessor_config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="alignlm.models.vision"):
        bare = HFVisionTower(name_or_path=str(folder))
    assert (bare.image_spec.mean, bare.image_spec.std) == (CLIP_MEAN, CLIP_STD)
    assert "saved no image processor with image_mean and image_std" in caplog.text


def test_an_unknown_aspect_ratio_of_a_later_stage_is_refused_before_the_first_trains():
    """Checked with every stage's other data knobs, before the first stage trains: a typo in the finetuning stage's
    setting had surfaced only once pretraining was done."""
    from alignlm.checks import check_config
    from alignlm.config import ConfigError

    with pytest.raises(ConfigError, match=r"stages.finetune.data.image_aspect_ratio='square' is not known"):
        check_config(compose("stages.finetune.data.image_aspect_ratio=square"))


def test_the_probes_and_the_monitor_see_the_images_as_the_stage_trained_on_them(model, tmp_path):
    """The alignment probes (``alignlm eval``'s, the in-training monitor's) padded every image: a cropping stage's
    checkpoint was measured on pixels it never trained on. They make the probe images square as the stage did."""
    from alignlm.data.images import ImageReading
    from alignlm.models.probes import extract, load_probe_set
    from alignlm.training.monitor import AlignmentMonitor

    shapes = [(45, 30), (30, 45), (50, 20)]
    path = caption_file(tmp_path, *shapes)
    probe = load_probe_set(path)
    model.eval()
    for aspect_ratio, llava in (("crop", "square"), ("pad", "pad")):
        reading = ImageReading(aspect_ratio)
        expected = torch.stack(
            [llava_pixels(noise(*s, seed=i), model.image_spec.size, llava) for i, s in enumerate(shapes)]
        )
        torch.testing.assert_close(probe.pixels(model.image_spec, reading)[:], expected, atol=1e-5, rtol=0)
        with torch.no_grad():
            tower = model.vision(expected)
        torch.testing.assert_close(extract(model, probe, reading=reading).encoder, tower.mean(dim=1))
        monitor = AlignmentMonitor({"every": 1, "probe": str(path), "topk": 1}, model, reading)
        model.frozen_parts.add("vision")
        torch.testing.assert_close(monitor.frozen_tower_features(model), tower)


def test_the_probes_read_images_under_their_stages_pixel_limit(model, tmp_path):
    """The probes, token-word accuracy and V2L's words read images against the default limit: a stage that lifted
    ``data.max_image_pixels`` trained on large images that its probe then refused, naming a limit it had not set."""
    from alignlm.data.build import image_reading_of
    from alignlm.data.images import ImageReading
    from alignlm.data.records import DataError
    from alignlm.models.probes import load_probe_set

    probe = load_probe_set(caption_file(tmp_path, (45, 30), (30, 45), (40, 25)))
    with pytest.raises(DataError, match=r"45x30 pixels, padded to a square 2025, over data.max_image_pixels=1000"):
        probe.pixels(model.image_spec, image_reading_of({"image_aspect_ratio": "pad", "max_image_pixels": 1000}))[0]
    assert probe.pixels(model.image_spec, ImageReading("crop", 2000))[0].shape[0] == 3  # 1350, resized 1536
    assert image_reading_of({"image_aspect_ratio": "crop", "max_image_pixels": None}) == ImageReading("crop", None)
    assert image_reading_of({}) == ImageReading()  # a config from before both settings: padded, the default limit


def test_eval_probes_a_cropping_stages_checkpoint_on_cropped_images(colour_set, tmp_path, monkeypatch):
    """``alignlm eval``'s probe of a checkpoint takes its stage's setting, as its answers do."""
    from omegaconf import OmegaConf

    from alignlm.evaluation import checkpoints as C
    from alignlm.evaluation import report

    cfg = compose(*tiny_overrides(colour_set, tmp_path))
    (ck,) = C.resolve([str(_saved_final(cfg, "pretrain"))])
    seen = []
    real = report.extract
    monkeypatch.setattr(report, "extract", lambda *a, **kw: seen.append(kw["reading"].aspect_ratio) or real(*a, **kw))
    ecfg = OmegaConf.to_container(compose().eval, resolve=True) | OmegaConf.to_container(
        OmegaConf.load("configs/eval/default.yaml"), resolve=True
    )
    ecfg["probe"] |= {
        "path": str(caption_file(tmp_path / "probe", (45, 30), (30, 45), (50, 20))),
        "topk": 1,
        "metrics": ["cka"],
    }
    ecfg["probe"]["artifacts"]["enabled"] = False
    ecfg["gap_shift"]["deltas"] = []
    report.evaluate_checkpoint(ck, ecfg, torch.device("cpu"))
    assert seen == ["crop"]


def test_a_checkpoint_written_before_the_setting_resumes_as_the_padding_it_did():
    """A step checkpoint's recipe from before data.image_aspect_ratio existed padded: a finetune stage (pad) resumes
    it as unchanged, a pretraining stage now cropping is told of the change."""
    from alignlm.training.checkpoint import recipe_changes

    before = {"seed": 0}
    assert recipe_changes(before, {"seed": 0, "stages.finetune.data.image_aspect_ratio": "pad"}) == {}
    changed = recipe_changes(before, {"seed": 0, "stages.pretrain.data.image_aspect_ratio": "crop"})
    assert changed == {"stages.pretrain.data.image_aspect_ratio": ("pad", "crop")}


def test_a_thin_strip_is_skipped_under_crop_with_the_feature_cache_as_without_it(tmp_path):
    """An image within the padded bound but over crop's resize bound: the cache leaves it out, and its sample is
    skipped as too large (it had been taken for an image the cache lacked, which stopped the stage)."""
    from accelerate import Accelerator

    from alignlm.data.llava import LlavaDataset
    from alignlm.data.records import Source
    from alignlm.data.templates import get_template
    from alignlm.models.build import build_model
    from alignlm.training.feature_cache import attach_feature_cache

    cfg = compose()
    model = build_model(cfg.model)
    model.frozen_parts.add("vision")
    # 2x30: padded 900 px, resized before the crop 15360 > 3000
    path = caption_file(tmp_path / "data", (45, 30), (2, 30))
    ds = LlavaDataset([Source(str(path))], model.tokenizer, get_template("plain"), model.image_spec,
                      model.num_image_tokens, image_aspect_ratio="crop", max_image_pixels=3000, on_error="skip")  # fmt: skip
    without = ds[1]
    attach_feature_cache(model, ds, True, tmp_path / "cache", cfg.model.vision, Accelerator(cpu=True))
    assert type(ds[1]) is type(without) and ds[1].cause == without.cause == IMAGE_TOO_LARGE
    assert isinstance(ds[0], dict)  # the other image is served from the cache
