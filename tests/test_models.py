"""Model assembly: towers, connectors, splicing of visual tokens, loss and gradients, on tiny CPU models."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from alignlm.constants import IGNORE_INDEX
from alignlm.models.build import build_model
from alignlm.models.connectors import LinearConnector, MLPConnector
from alignlm.models.lm_loss import head_transform, linear_weight
from alignlm.models.mllm import AlignLM
from alignlm.models.vision import EfficientNetLiteTower, HFVisionTower
from tests.conftest import compose, make_batch, small_llm_shape


def test_tiny_model_builds_fast():
    cfg = compose().model
    build_model(cfg)  # the first build pays for importing transformers' model code
    start = time.perf_counter()
    model = build_model(cfg)
    assert time.perf_counter() - start < 1.0
    assert model.num_image_tokens == 16  # 32 px / patch 8 -> 4x4
    assert model.tokenizer.convert_tokens_to_ids("<image>") == model.image_token_id
    assert model.llm.get_input_embeddings().num_embeddings >= len(model.tokenizer)


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "linear"])
def test_forward_backward_per_connector(tiny_model, connector):
    model = tiny_model(f"model/connector={connector}")
    batch = make_batch(model, [1, 2, 0])
    out = model(batch)
    assert out.visual_tokens.shape == (3, model.num_image_tokens, model.llm.config.hidden_size)
    assert out.image_positions.sum() == 3 * model.num_image_tokens
    assert torch.isfinite(out.lm_loss)
    out.lm_loss.backward()
    grads = [p.grad for p in model.connector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "linear", "moe"])
def test_visual_token_norm_fixes_every_token(tiny_model, connector):
    """model.visual_token_norm: each visual token (any connector, any caller) has that multiple of the mean norm of
    the LLM's token embeddings as built, and the connector still trains through the normalisation."""
    base = tiny_model(f"model/connector={connector}")
    model = tiny_model(f"model/connector={connector}", "model.visual_token_norm=2.0")
    assert base.connector.token_norm is None
    table = base.llm.get_input_embeddings().weight
    built = torch.arange(table.shape[0]) != base.image_token_id  # the rows as built, before <image> was added
    expected = 2.0 * table[built].float().norm(dim=-1).mean().item()
    assert model.connector.token_norm == pytest.approx(expected, rel=1e-5)
    out = model(make_batch(model, [1, 2, 0]))
    torch.testing.assert_close(out.visual_tokens.norm(dim=-1), torch.full(out.visual_tokens.shape[:2], expected))
    direct = model.connector(torch.randn(2, 5, model.vision.hidden_size)).tokens
    torch.testing.assert_close(direct.norm(dim=-1), torch.full((2, 5), expected))
    out.lm_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())


@pytest.mark.parametrize("value", [0, -1.0, "big", True])
def test_visual_token_norm_rejects_bad_values(tiny_model, value):
    with pytest.raises(ValueError, match="model.visual_token_norm"):
        tiny_model(f"model.visual_token_norm={value}")


def test_mlp_depth_and_linear_shapes():
    mlp3 = MLPConnector(8, 16, depth=3)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp3.proj) == 3
    assert mlp3(torch.randn(2, 5, 8)).tokens.shape == (2, 5, 16)
    assert LinearConnector(8, 16, bias=False)(torch.randn(2, 5, 8)).tokens.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="depth"):
        MLPConnector(8, 16, depth=0)


def test_loss_matches_transformers_reference(tiny_model):
    """Sparse-logit loss equals the HF causal-LM loss on the same spliced embeddings."""
    model = tiny_model()
    batch = make_batch(model, [1, 0, 2])
    out = model(batch)
    embeds, _ = model.embed(batch)
    ref = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(out.lm_loss, ref, rtol=1e-5, atol=1e-5)


def test_each_sample_sees_its_own_images(tiny_model):
    """Splicing keeps reading order: changing image 2 changes only the sample that holds it."""
    model = tiny_model()
    model.eval()
    batch = make_batch(model, [1, 2, 1])
    base = model(batch, return_logits=True).logits
    batch["pixel_values"] = batch["pixel_values"].clone()
    batch["pixel_values"][2] += 1.0  # second image of sample 1
    changed = model(batch, return_logits=True).logits
    diff = (changed - base).abs().flatten(1).amax(1)
    assert diff[1] > 1e-4 and diff[0] == 0 and diff[2] == 0


def test_text_only_batch_runs_vision_path(tiny_model):
    model = tiny_model()
    batch = make_batch(model, [0, 0])
    out = model(batch)
    out.lm_loss.backward()
    # the zero image keeps the connector in the graph (DDP/ZeRO-3 need every rank to touch it)
    assert all(p.grad is not None for p in model.connector.parameters())


def test_the_zero_image_leaves_a_trained_towers_batchnorm_statistics_alone(tiny_model):
    """A text-only micro-batch runs a zero stand-in image through a trained tower (so that every rank's tower takes
    part in the step); in training mode it moved every BatchNorm layer's running statistics towards that image. It
    runs in eval mode now, each module back in its own mode after, and the tower still gets its (zero) gradients."""
    from alignlm.training.stages import apply_stage

    model = tiny_model("model/vision=efficientnet_lite0", "model.vision.weights=null", "model.vision.image_size=64")
    apply_stage(model, {"vision": "full", "connector": "full", "llm": "frozen"})
    norms = [m for m in model.vision.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and model.vision.training
    norms[0].eval()  # a module in its own mode: it must stay so
    modes = [m.training for m in model.vision.modules()]
    before = {k: v.clone() for k, v in model.vision.state_dict().items() if "running" in k or "num_batches" in k}
    model(make_batch(model, [0, 0])).lm_loss.backward()
    after = model.vision.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [m.training for m in model.vision.modules()] == modes
    taking_part = [p for n, p in model.vision.named_parameters() if "_fc" not in n]  # _fc: the unused classifier
    assert all(p.grad is not None for p in taking_part)


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_the_lm_loss_applies_the_transform_the_llms_head_output_gets(tiny_model, family):
    """Granite divides its head's output by config.logits_scaling, Cohere multiplies it by config.logit_scale: the LM
    loss (chunked), each sample's log-probability and the logits are those of the causal LM's own forward (from the
    head's weight alone, Granite's loss was 2.4 times its own)."""
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    base = tiny_model()
    size = small_llm_shape(base)
    torch.manual_seed(0)
    if family == "granite":
        llm = GraniteForCausalLM(GraniteConfig(logits_scaling=8.0, **size))
    else:
        llm = CohereForCausalLM(CohereConfig(logit_scale=0.0625, **size))
    with torch.no_grad():
        llm.get_output_embeddings().weight.mul_(30)  # logits as sharp as a trained head's
    model = AlignLM(base.vision, base.connector, llm, base.tokenizer).eval()
    assert not head_transform(llm.config).plain
    batch = make_batch(model, [0, 0], text_len=8)
    with torch.no_grad():
        out = model(batch, return_logits=True, sample_logps=True)
        own = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift = batch["labels"][:, 1:]
    token = F.cross_entropy(own[:, :-1].transpose(1, 2).float(), shift, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(out.lm_loss_sum, token.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.sample_logps, -token.sum(1), rtol=1e-5, atol=1e-4)  # one sample per row
    torch.testing.assert_close(model(batch).lm_loss_sum, token.sum(), rtol=1e-5, atol=1e-4)  # the summed path
    torch.testing.assert_close(out.logits, own, rtol=1e-5, atol=1e-4)


def test_head_transforms_follow_each_model_types_own_rule():
    """``logits_scaling`` divides (Granite) or multiplies (HyperCLOVAX) by model type, MPT's ``logit_scale`` is never
    applied by its transformers model, and a value alignlm cannot apply is refused, naming model.llm."""
    from types import SimpleNamespace as Config

    assert head_transform(Config(model_type="llama")).plain
    assert head_transform(Config(model_type="granite", logits_scaling=4)).scale == 0.25
    assert head_transform(Config(model_type="hyperclovax", logits_scaling=4)).scale == 4.0
    assert head_transform(Config(model_type="mpt", logit_scale=3.0)).plain
    capped = head_transform(Config(model_type="gemma2", final_logit_softcapping=30.0))
    assert capped.softcap == 30.0 and not capped.plain
    with pytest.raises(ValueError, match="model.llm.*logit_scale='inv_sqrt_d_model'"):
        head_transform(Config(model_type="cohere", logit_scale="inv_sqrt_d_model"))


def test_lora_on_the_lm_head_trains_its_adapter(tiny_model):
    """stage.lora.target_modules may name the LM head: peft wraps it, and the loss, which read the head's base weight,
    never ran the adapter (its weights got no gradient, though generation used them). Such a head runs as a module."""
    from alignlm.training.stages import apply_stage

    model = tiny_model()
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "lm_head"]}
    apply_stage(model, {"connector": "full", "llm": "lora"}, lora)
    head = model.llm.get_output_embeddings()
    assert linear_weight(head) is None  # a head that adds its adapter: run as a module, not read as a matmul
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    batch = make_batch(model, [1, 0, 2])
    out = model(batch, sample_logps=True)
    embeds, _ = model.embed(batch)
    own = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits  # the adapter included
    shift = batch["labels"][:, 1:]
    token = F.cross_entropy(own[:, :-1].transpose(1, 2).float(), shift, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(out.lm_loss_sum, token.sum().detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.sample_logps, -token.sum(1), rtol=1e-5, atol=1e-4)
    model(batch).lm_loss.backward()
    adapter = [p for n, p in model.llm.named_parameters() if "lm_head.lora_" in n]
    assert len(adapter) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter)


def test_slot_mismatch_is_a_clear_error(tiny_model):
    model = tiny_model()
    batch = make_batch(model, [1])
    batch["pixel_values"] = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="image-token slots"):
        model(batch)


def test_image_embeds_bypass_the_tower(tiny_model):
    model = tiny_model()
    batch = make_batch(model, [1, 1])
    feats = model.vision(batch.pop("pixel_values"))
    batch["image_embeds"] = feats
    assert torch.isfinite(model(batch).lm_loss)


@pytest.mark.parametrize(
    "config,prefix",
    [
        (
            {
                "model_type": "clip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            1,
        ),
        (
            {
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            0,
        ),
        (
            {
                "model_type": "dinov2",
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            1,
        ),
    ],
)
def test_hf_towers_select_feature(config, prefix):
    patch = HFVisionTower(config=config, select_feature="patch")
    both = HFVisionTower(config=config, select_feature="cls_patch")
    x = torch.randn(2, 3, 32, 32)
    assert patch(x).shape == (2, 16, 32)
    assert both(x).shape == (2, 16 + prefix, 32)
    assert (patch.num_prefix_tokens, both.num_prefix_tokens) == (0, prefix)


def test_hf_cnn_backbone_feature_map_becomes_tokens():
    config = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "image_size": 64}
    tower = HFVisionTower(config=config, select_layer=-1)
    assert tower(torch.randn(2, 3, 64, 64)).shape == (2, tower.num_patches, 16)
    pooled = HFVisionTower(config=config, select_layer=-1, select_feature="cls_patch")
    assert pooled.num_patches == tower.num_patches + 1


def test_a_hydra_config_with_lists_builds_a_hf_tower():
    """Hydra hands the tower a DictConfig whose lists are ListConfigs, which transformers' strict configs refused:
    a CNN tower's ``hidden_sizes`` could not be set from ``configs/``."""
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "image_size": 64}
    )
    tower = HFVisionTower(config=config, select_layer=-1)
    assert tower.model.config.hidden_sizes == [8, 16] and tower.hidden_size == 16


def test_tower_loads_a_saved_checkpoint_by_path(tmp_path):
    """Loading by name is the same code path as loading a folder the test saved itself."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    CLIPVisionModel(cfg).save_pretrained(tmp_path)
    tower = HFVisionTower(name_or_path=str(tmp_path))
    ref = CLIPVisionModel.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    expected = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(tower(x), expected)


def test_tower_trains_a_half_precision_checkpoint_in_float32(tiny_model, tmp_path):
    """A tower saved in bf16 (as Llava exports and many hub towers are) loaded in bf16: the fp32 model crashed."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    CLIPVisionModel(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    model = tiny_model("~model.vision.config", f"+model.vision.name_or_path={tmp_path}")
    assert {p.dtype for p in model.vision.parameters()} == {torch.float32}
    assert torch.isfinite(model(make_batch(model, [1, 2])).lm_loss)
    half = tiny_model("~model.vision.config", f"+model.vision.name_or_path={tmp_path}", "model.vision.dtype=bfloat16")
    assert {p.dtype for p in half.vision.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="model.vision.dtype='half'.*bfloat16"):
        HFVisionTower(name_or_path=str(tmp_path), dtype="half")


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "convnext", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "image_size": 64},
        {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "image_size": 64},
    ],
)
def test_cnn_tower_prefix_is_its_pooled_token(config):
    """A feature map's tokens are its grid, plus the pooled token under cls_patch; ConvNeXt's stem patch_size of 4
    was read as a ViT's patch grid, giving -239 prefix tokens (what SEA's grid and V2L's pooling skip)."""
    patch = HFVisionTower(config=config, select_feature="patch")
    both = HFVisionTower(config=config, select_feature="cls_patch")
    assert patch.num_prefix_tokens == 0 and both.num_prefix_tokens == 1
    assert both.num_patches == patch.num_patches + 1


def test_efficientnet_tower_tokens():
    tower = EfficientNetLiteTower(image_size=64, weights=None)
    x = torch.randn(2, 3, 64, 64)
    assert tower(x).shape == (2, 4, 1280)
    pooled = EfficientNetLiteTower(image_size=64, weights=None, select_feature="cls_patch")
    pooled.load_state_dict(tower.state_dict())
    tower.eval(), pooled.eval()
    out = pooled(x)
    assert out.shape == (2, 5, 1280) and pooled.num_patches == 5
    torch.testing.assert_close(out[:, 0], tower(x).mean(1))
    with pytest.raises(ValueError, match="multiple of 32"):
        EfficientNetLiteTower(image_size=100, weights=None)


def test_frozen_parts_stay_in_eval_mode(tiny_model):
    from alignlm.training.stages import apply_stage

    model = tiny_model()
    apply_stage(model, {"vision": "frozen", "connector": "full", "llm": "frozen"})
    model.train()
    assert not model.vision.training and model.connector.training and not model.llm.training
    assert not any(p.requires_grad for p in model.llm.parameters())


def test_unknown_stage_mode_lists_choices(tiny_model):
    from alignlm.training.stages import apply_stage

    with pytest.raises(ValueError, match="frozen.*full.*lora"):
        apply_stage(tiny_model(), {"llm": "half"})


def test_lora_alpha_below_one_keeps_its_scaling(tiny_model):
    """LoRA's update is scaled by alpha / r; alpha was cast to int, so an alpha of 0.5 trained a scaling of 0."""
    from alignlm.training.stages import apply_stage

    model = tiny_model()
    apply_stage(model, {"connector": "full", "llm": "lora"}, {"r": 4, "alpha": 0.5, "dropout": 0.0})
    scalings = {m.scaling["default"] for m in model.llm.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {0.125}


def test_llm_loads_a_saved_checkpoint_by_path(tmp_path):
    """``model/llm`` by name or path is one code path: save a tiny Llama + tokenizer, load it as a user would."""
    from alignlm.models.llm import tiny

    llm, tok = tiny()
    llm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = build_model(
        compose("model/llm=qwen2_5_0_5b", f"model.llm.name_or_path={tmp_path}", "model.llm.dtype=float32").model
    )
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model.llm(input_ids=ids).logits[..., : len(tok)], llm(input_ids=ids).logits)


def test_an_llm_folders_decoding_settings_do_not_reach_generation(tmp_path):
    """A folder's generation_config.json (Qwen2.5's samples, penalises repeats, top-k 20) filled every setting
    eval.generation left unset: "greedy" evaluation penalised repeats, and export --check compared that with the
    exported Llava's greedy answers. Only its special token ids are kept."""
    from transformers import GenerationConfig

    from alignlm.models.llm import tiny

    torch.manual_seed(0)
    llm, tok = tiny()
    llm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GenerationConfig(**ids, do_sample=True, top_p=0.8, top_k=20, repetition_penalty=1.1).save_pretrained(tmp_path)
    model = build_model(
        compose("model/llm=qwen2_5_0_5b", f"model.llm.name_or_path={tmp_path}", "model.llm.dtype=float32").model
    ).eval()
    kept = model.llm.generation_config
    assert {k: getattr(kept, k) for k in ids} == ids and not kept.do_sample and kept.repetition_penalty in (None, 1.0)
    batch = make_batch(model, [1])
    batch = {k: v for k, v in batch.items() if k != "labels"}
    greedy = model.generate(batch, max_new_tokens=24, do_sample=False)
    plain = model.generate(batch, max_new_tokens=24, do_sample=False, repetition_penalty=1.0, top_k=None, top_p=None)
    assert torch.equal(greedy, plain)


def test_the_demo_llms_conversion_is_whole_once_and_leaves_no_temporary(tmp_path, monkeypatch):
    """The GGUF -> safetensors conversion writes beside the cache folder and renames: a conversion that fails leaves
    no temporary folder behind, and one that finds the folder written meanwhile (another rank or run converted first)
    keeps that one instead of failing to rename onto it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlm.models import llm as loaders

    model, tok = loaders.tiny()
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    gguf = tmp_path / "wheel" / "model.gguf"
    loaders._convert_gguf(gguf, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "model.safetensors").is_file()
    won = tmp_path / "won"
    won.mkdir()
    (won / "model.safetensors").write_bytes(b"the other process's")
    loaders._convert_gguf(gguf, won)
    assert (won / "model.safetensors").read_bytes() == b"the other process's"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tok), "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space"):
        loaders._convert_gguf(gguf, tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "won"]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    a, b = tiny_model(), tiny_model()
    b.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    a.train(), b.train()
    batch = make_batch(a, [1, 2])
    a(batch).lm_loss.backward()
    b(batch).lm_loss.backward()
    for pa, pb in zip(a.connector.parameters(), b.connector.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


@pytest.mark.slow
def test_demo_models_load_offline():
    """The embedded default: real EfficientNet-Lite0 and SmolLM2-135M from their wheels, no hub."""
    model = build_model(compose("model=demo").model)
    assert model.vision.hidden_size == 1280 and model.num_image_tokens == 17  # pooled token + 4x4 map
    assert model.llm.config.hidden_size == 576
    batch = make_batch(model, [1, 0], text_len=4)
    assert torch.isfinite(model(batch).lm_loss)
    # the tower is really pretrained: scikit-learn's bundled flower photo is an ImageNet daisy (class 985)
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from alignlm.data.images import ImageSpec, preprocess

    x = preprocess(
        Image.fromarray(load_sample_image("flower.jpg")),
        ImageSpec(224, model.image_spec.mean, model.image_spec.std),
        aspect_ratio="crop",
    )
    with torch.no_grad():
        top5 = model.vision.model.eval()(x[None]).topk(5).indices[0].tolist()  # eval: BatchNorm running stats
    assert 985 in top5


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chat"])
def test_generation_stops_at_the_templates_end_of_turn(colour_set, tmp_path, template):
    """The model's tokens are forced (answer, the template's end of turn, then more): an answer ends where the template
    ends a turn. ``plain`` ends a turn with a newline, and a pretrain checkpoint used to write on to max_new_tokens."""
    import json

    from omegaconf import OmegaConf
    from transformers import LogitsProcessor, LogitsProcessorList

    from alignlm.models.generation import generate_set
    from tests.conftest import compose

    class Force(LogitsProcessor):
        def __init__(self, rows):
            self.rows = rows
            self.prompt: int | None = None  # the ids hold the prompt, then the answer so far

        def __call__(self, input_ids, scores):
            self.prompt = input_ids.shape[1] if self.prompt is None else self.prompt
            out = torch.full_like(scores, -1e9)
            for b, seq in enumerate(self.rows):
                out[b, seq[min(input_ids.shape[1] - self.prompt, len(seq) - 1)]] = 0
            return out

    cfg = compose()
    model = build_model(cfg.model).eval()
    data = {**OmegaConf.to_container(cfg.stages.finetune.data, resolve=True), "template": template}
    records = json.loads(colour_set["test"].read_text())[:4]
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(records))
    tok = model.tokenizer

    def enc(text):
        return tok(text, add_special_tokens=False).input_ids

    end = {"plain": enc("\n"), "vicuna_v1": [tok.eos_token_id], "chat": [tok.convert_tokens_to_ids("<|im_end|>")]}
    rows = [
        [tok.eos_token_id],  # EOS first: an empty answer
        enc("red") + end[template] + enc(" blue green yellow"),
        enc("blue green two three four five six seven"),  # never ends: max_new_tokens
        end[template] + enc(" yellow"),  # the end of turn first: an empty answer
    ]
    generation = {"do_sample": False, "logits_processor": LogitsProcessorList([Force(rows)])}
    preds = generate_set(model, str(questions), data, batch_size=4, max_new_tokens=8, generation=generation,
                         image_root=str(colour_set["test"].parent))  # fmt: skip
    assert [p for _, p, _ in preds][:2] + [p for _, p, _ in preds][3:] == ["", "red", ""]
    assert preds[2][1].startswith("blue green")


def test_repetition_penalty_answers_the_same_batched_one_by_one_and_exported(colour_set, tmp_path):
    """With a repetition penalty, a left-padded row's first answer tokens went unpenalised (transformers skipped the
    row's padding count of ids that held only the answer), so batched answers differed from one-by-one ones. With the
    prompt's ids passed, every row is penalised as alone, and as the exported Llava penalises it (prompt included)."""
    import json

    from omegaconf import OmegaConf

    from alignlm.export.hf_llava import to_llava
    from alignlm.models.generation import prompt_batches

    cfg = compose()
    model = build_model(cfg.model).eval()
    data = {**OmegaConf.to_container(cfg.stages.finetune.data, resolve=True), "template": "vicuna_v1"}
    records = json.loads(colour_set["test"].read_text())[:4]
    records[1]["conversations"][0]["value"] = "<image>\nWhat color is it? Please answer in one long word now."
    records[2]["conversations"][0]["value"] = "What color? <image>"
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(records))
    settings = {"max_new_tokens": 12, "do_sample": False, "repetition_penalty": 5.0}
    hf = to_llava(model)

    def answers(batch_size: int) -> tuple[list[list[int]], list[list[int]]]:
        ours, theirs = [], []
        batches = prompt_batches(model, str(questions), data, batch_size, image_root=str(colour_set["test"].parent))
        for inputs, _ in batches:
            ours += model.generate(inputs, **settings).tolist()
            hf_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
            theirs += hf.generate(**hf_inputs, **settings)[:, inputs["input_ids"].shape[1] :].tolist()
        return ours, theirs

    (batched, hf_batched), (alone, _) = answers(4), answers(1)
    assert batched == alone == hf_batched
    inputs, _ = next(prompt_batches(model, str(questions), data, 4, image_root=str(colour_set["test"].parent)))
    out = model.generate(inputs, return_dict_in_generate=True, output_scores=True, **settings)
    assert out.sequences.tolist() == batched and len(out.scores) == out.sequences.shape[1]  # the answers only


@pytest.mark.parametrize("key", ["return_dict_in_generate", "output_scores", "output_logits"])
def test_generation_settings_that_change_what_generate_returns_are_refused(key):
    """``eval.generation={return_dict_in_generate: true}`` failed with a TypeError once answers were decoded."""
    from alignlm.config import ConfigError
    from alignlm.models.generation import check_generation

    with pytest.raises(ConfigError, match=rf"eval.generation sets \['{key}'\], which alignlm sets itself"):
        check_generation({key: True, "do_sample": False})


def test_a_tower_or_llm_stored_in_half_precision_feeds_the_model_without_a_dtype_error(tiny_model):
    """``model.vision.dtype=bfloat16`` gave an fp32 connector bf16 features: a dtype error at the first step without
    autocast, and under bf16 autocast at the evaluation after the stages had trained; the connector takes features
    in its own dtype. An LLM loaded in fp16 under the CPU's bf16 autocast: splicing the visual tokens into its fp16
    embeddings failed ("Unexpected floating ScalarType in at::autocast::prioritize")."""
    model = tiny_model().eval()
    batch = make_batch(model, [1, 2, 0])
    with torch.no_grad():
        want = model(batch).lm_loss
        model.vision.to(torch.bfloat16)
        got = model(batch).lm_loss
        assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-2)
        model.vision.float()
        model.llm.to(torch.float16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(batch).lm_loss)
