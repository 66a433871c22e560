"""LoRA targets checked before any stage trains (a tied LM head or embedding, a layer type peft cannot adapt, a
string target that names layers), and gradient checkpointing of a LoRA-adapted tower."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from alignlm.checks import check_stages_fit_model
from alignlm.config import ConfigError
from alignlm.models.build import build_model
from alignlm.training.stages import apply_stage, merge_lora
from alignlm.training.trainer import enable_checkpointing
from tests.conftest import compose, make_batch, tiny_overrides

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def finetune_lora(*targets: str):
    """A config whose finetune stage adapts the LLM with LoRA on ``targets`` (an override value, e.g. ``[q_proj]``)."""
    return compose("stages.finetune.parts.llm=lora", *(f"stages.finetune.lora.target_modules={t}" for t in targets))


def tie(model):
    """``model`` with its LLM's LM head tied to its input embeddings, as SmolLM2-135M and Qwen2.5-0.5B ship (the tiny
    LLM is untied)."""
    model.llm.config.tie_word_embeddings = True
    model.llm.lm_head.weight = model.llm.get_input_embeddings().weight
    return model


# ---- a tied LM head or embedding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "adapted", "other"),
    [("lm_head", "lm_head", "model.embed_tokens"), ("embed_tokens", "model.embed_tokens", "lm_head")],
)
def test_lora_on_a_tied_head_or_embedding_is_refused_before_anything_trains(target, adapted, other):
    """The adapter trained one use of the shared weight; merged into it for ``final/`` it changed both, so ``final/``
    answered otherwise than the model trained."""
    cfg = finetune_lora(f"[q_proj,{target}]")
    with pytest.raises(ConfigError) as refused:
        check_stages_fit_model(cfg, ["pretrain", "finetune"], tie(build_model(cfg.model)))
    message = str(refused.value)
    assert message.startswith("stages.finetune.lora.target_modules=['q_proj', " + repr(target))
    assert f"adapts model.llm.{adapted}, whose weight is tied to model.llm.{other}'s" in message
    assert f"Leave {target} out" in message and "tie_word_embeddings: false" in message
    assert "stages.finetune.parts.llm=full" in message


def test_lora_on_an_untied_head_and_all_linear_on_a_tied_one_are_allowed():
    """An untied head (the tiny LLM's) may carry an adapter; ``all-linear`` leaves a tied head out, as peft does, so
    the merged model is the model trained."""
    untied = finetune_lora("[q_proj,lm_head]")
    check_stages_fit_model(untied, ["finetune"], build_model(untied.model))
    every = finetune_lora("all-linear")
    model = tie(build_model(every.model))
    check_stages_fit_model(every, ["finetune"], model)
    torch.manual_seed(0)
    apply_stage(model, {"connector": "full", "llm": "lora"}, {**LORA, "target_modules": "all-linear"})
    assert not hasattr(model.llm.get_output_embeddings(), "lora_A")
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    model.eval()
    batch = make_batch(model, [1, 0, 2])
    with torch.no_grad():
        trained = model(batch, sample_logps=True).sample_logps
        merge_lora(model)
        merged = model(batch, sample_logps=True).sample_logps
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-4)


def test_a_tied_llm_with_its_head_among_lora_targets_is_refused_before_pretraining(colour_set, tmp_path):
    """End to end: a tied LLM folder loads tied, and the finetune stage's targets are refused when the pretraining
    stage begins, before it trains."""
    from omegaconf import OmegaConf

    from alignlm.models.llm import tiny
    from alignlm.pipeline import run

    llm, tok = tiny()
    llm.config.tie_word_embeddings = True
    llm.lm_head.weight = llm.model.embed_tokens.weight
    llm.save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path / "out", "stages.finetune.parts.llm=lora", "eval.sets=[]"),
        "stages.finetune.lora.target_modules=[q_proj,v_proj,lm_head]",
    )
    cfg.model.llm = OmegaConf.create(
        {"_target_": "alignlm.models.llm.pretrained", "name_or_path": str(tmp_path / "tied")}
    )
    with pytest.raises(ConfigError, match=r"adapts model\.llm\.lm_head, whose weight is tied"):
        run(cfg)
    assert not any((tmp_path / "out").rglob("*.safetensors"))


# ---- layers peft cannot adapt ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "module", "kind"),
    [
        ("[norm]", "model.norm", "LlamaRMSNorm"),
        ("[q_proj,input_layernorm]", "model.layers.0.input_layernorm", "LlamaRMSNorm"),
        ("[layers.0.self_attn]", "model.layers.0.self_attn", "LlamaAttention"),
    ],
)
def test_lora_targets_of_a_type_peft_cannot_adapt_are_refused_before_anything_trains(targets, module, kind):
    """They named modules, so the name check passed, and peft refused them ("Target module ... is not supported") when
    their stage began, after the stages before it had trained."""
    cfg = finetune_lora(targets)
    with pytest.raises(ConfigError) as refused:
        check_stages_fit_model(cfg, ["pretrain", "finetune"], build_model(cfg.model))
    message = str(refused.value)
    assert message.startswith("stages.finetune.lora.target_modules=")
    assert f"adapts model.llm.{module}, a {kind}, which LoRA cannot adapt" in message
    if kind == "LlamaAttention":
        assert "name the layers inside it instead ([k_proj, o_proj, q_proj, v_proj])" in message


# ---- a string target -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "listed"), [("q_proj", "[q_proj]"), ("q_proj,v_proj", "[q_proj, v_proj]")])
def test_a_string_target_naming_layers_says_it_is_a_pattern_and_gives_the_list_form(pattern, listed):
    """peft matches a string against a module's whole dotted name; the refusal suggested the very name it refused."""
    cfg = compose("stages.finetune.parts.llm=lora")
    cfg.stages.finetune.lora.target_modules = pattern  # a plain string, as LLaMA-Factory writes it
    with pytest.raises(ConfigError) as refused:
        check_stages_fit_model(cfg, ["finetune"], build_model(cfg.model))
    message = str(refused.value)
    assert message.startswith(f"stages.finetune.lora.target_modules={pattern!r} matches no module of model.llm")
    assert "a string is a pattern matched against a module's whole name" in message
    assert message.endswith(f"write stages.finetune.lora.target_modules={listed}")
    assert "did you mean" not in message


# ---- gradient checkpointing of a LoRA tower ------------------------------------------------------------------------


def test_a_lora_tower_checkpoints_its_layers_and_gets_the_same_gradients(tiny_model):
    """``parts.vision=lora`` with ``gradient_checkpointing: [llm, vision]`` failed: the peft wrapper's ``model`` is the
    tower, not its transformers model. Its layers now checkpoint, keeping fewer activations, with the same numbers."""
    saved, losses, grads = [], [], []
    for parts in ([], ["llm"], ["llm", "vision"]):
        model = tiny_model()
        torch.manual_seed(0)  # the adapters' initial weights
        apply_stage(
            model, {"vision": "lora", "connector": "full", "llm": "lora"}, {**LORA, "target_modules": "all-linear"}
        )
        enable_checkpointing(model, parts)
        layers = [m for m in model.vision.get_base_model().model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert layers and all(layer.gradient_checkpointing == ("vision" in parts) for layer in layers)
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(note_size, sizes), lambda t: t):
            out = model(make_batch(model, [1, 1, 0], text_len=8))
        out.lm_loss.backward()
        saved.append(sum(sizes))
        losses.append(out.lm_loss.detach())
        grads.append({n: p.grad for n, p in model.vision.named_parameters() if p.requires_grad})
    assert saved[2] < saved[1] < saved[0]
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        torch.testing.assert_close(loss, losses[0])
        torch.testing.assert_close(grad, grads[0])


def note_size(sizes: list[int], tensor: torch.Tensor) -> torch.Tensor:
    """A saved-tensors hook: count what autograd keeps for the backward."""
    sizes.append(tensor.numel())
    return tensor


def test_checkpointing_a_tower_that_cannot_checkpoint_is_refused_before_anything_trains():
    """``gradient_checkpointing: [llm, vision]`` on the demo's EfficientNet-Lite (or ReVision's dual-encoder tower)
    was refused when the finetuning stage began, after pretraining had trained."""
    cfg = compose("model=tiny", "stages.finetune.gradient_checkpointing=[llm,vision]")
    model = build_model(cfg.model)
    check_stages_fit_model(cfg, ["pretrain", "finetune"], model)  # a transformers tower checkpoints
    model.vision.model = torch.nn.Identity()  # a tower of no transformers model
    with pytest.raises(ConfigError, match=r"stages.finetune.gradient_checkpointing: model.vision \(Identity\) cannot"):
        check_stages_fit_model(cfg, ["pretrain", "finetune"], model)
