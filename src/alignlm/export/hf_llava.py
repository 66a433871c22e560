"""Export to, and import from, transformers' ``LlavaForConditionalGeneration``.

The ecosystem (transformers, vLLM, lmms-eval, the Hub) speaks Llava, so a trained alignlm model leaves as a
directory that ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load with
no custom code, and a published Llava checkpoint comes in as ``init_from`` to continue training.

Llava's architecture is fixed: a transformers vision model (``hidden_states[vision_feature_layer]``, with the CLS
token dropped or kept), a two-layer projector ``linear_1 -> act -> linear_2``, and a causal LM. alignlm models that
fit (an ``HFVisionTower``, the ``mlp2x_gelu`` connector) map onto it weight for weight; anything else (CNN towers,
MoE or linear connectors, towers with register tokens, extra input parts, LLMs that transform their head's logits)
is refused up front with the reason.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from alignlm.config import ConfigError
from alignlm.constants import ALIKE_ON_EVERY_RANK, IMAGE_TOKEN
from alignlm.data.build import aspect_ratio_of
from alignlm.data.images import check_aspect_ratio
from alignlm.data.templates import get_template, turn_end
from alignlm.files import temporary_path
from alignlm.models.connectors.mlp import MLPConnector
from alignlm.models.io import (
    FINAL_FILES,
    MODEL_FILES,
    checkpoint_stage,
    config_yaml,
    final_stage,
    load_checkpoint_config,
    load_model,
    model_stamps,
)
from alignlm.models.llm import with_chat_template
from alignlm.models.lm_loss import head_transform
from alignlm.models.loading import check_finite, refuse_hub_kernel_attention
from alignlm.models.mllm import AlignLM
from alignlm.models.vision import HFVisionTower, saved_image_norm, saved_image_processor


class ExportError(ValueError):
    """A model that transformers' Llava cannot represent; the message says why and what to use instead."""


_ALTERNATIVE = "keep alignlm's own format (final/, loaded with alignlm.models.io.load_model)"


def selected_hidden(vision: HFVisionTower) -> torch.Tensor:
    """The tower's selected hidden state of one blank image, before alignlm picks its tokens: what Llava's vision
    tower hands its projector (``[1, T, D]``), or a convolutional tower's feature map (``[1, C, H, W]``)."""
    size = vision.image_spec.size
    with torch.no_grad():
        out = vision.model(
            pixel_values=torch.zeros(1, 3, size, size, dtype=vision.model.dtype, device=vision.model.device),
            output_hidden_states=True,
        )
    return out.hidden_states[vision.select_layer]


def feature_strategy(vision: HFVisionTower) -> str:
    """Llava's ``vision_feature_select_strategy`` reproducing the tower's ``select_feature``.

    ``default`` drops exactly one leading token (CLIP's CLS); ``full`` keeps every token (SigLIP, or ``cls_patch``).
    """
    cfg = vision.model.config
    grid = (cfg.image_size // cfg.patch_size) ** 2
    prefix = selected_hidden(vision).shape[1] - grid
    if vision.select_feature == "cls_patch" and vision.num_registers:
        raise ExportError(
            f"the vision tower's {vision.num_registers} register tokens are dropped (registers=drop) while CLS is kept; "
            "Llava keeps all prefix tokens or drops exactly one. Train with model.vision.registers=keep, or "
            f"{_ALTERNATIVE}"
        )
    if vision.select_feature == "cls_patch" or prefix == 0:
        return "full"
    if prefix == 1:
        return "default"
    registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
    keep = "select_feature=cls_patch" + (" with model.vision.registers=keep" if registers else "")
    raise ExportError(
        f"the vision tower has {prefix} prefix tokens{f' (CLS and {registers} registers)' if registers else ''} that "
        f"select_feature='patch' drops; Llava can drop only one (CLS). Use {keep} to keep them all, or {_ALTERNATIVE}"
    )


# An LLM config's transforms of its head's logits (key, the value that changes nothing; 0 is no soft cap): alignlm's
# forward applies them (models/lm_loss.py), transformers' Llava computes ``lm_head(hidden)`` alone and would drop them.
def check_exportable(model: AlignLM) -> str:
    """Raise ``ExportError`` unless Llava can represent ``model``; return the feature strategy it will use."""
    if model.extras:
        raise ExportError(
            f"the model has extra input parts (model.extras: {sorted(model.extras)}) that write their own token after BOS: "
            "Llava has no such parts, so an export would answer differently from the trained model. "
            f"{_ALTERNATIVE[0].upper() + _ALTERNATIVE[1:]}"
        )
    if type(model.vision) is not HFVisionTower:
        # exactly HFVisionTower, as for the connector below: a subclass may compute its features otherwise (two layers
        # averaged, say), which Llava's tower would not repeat, so the export would answer differently without a word
        kind = (
            "a subclass of HFVisionTower: what it computes otherwise (two hidden layers averaged, say) Llava's tower "
            "would not repeat"
            if isinstance(model.vision, HFVisionTower)
            else "not a transformers vision model, and Llava loads its tower with AutoModel"
        )
        raise ExportError(
            f"vision tower {type(model.vision).__module__}.{type(model.vision).__qualname__} is {kind}; export needs "
            f"model.vision=HFVisionTower itself (CLIP, SigLIP, ...), or {_ALTERNATIVE}"
        )
    if selected_hidden(model.vision).dim() == 4:
        raise ExportError(
            f"vision model {model.vision.model.config.model_type!r} is convolutional: its layer "
            f"{model.vision.select_layer} (model.vision.select_layer) is a feature map, which alignlm flattens into "
            "tokens; Llava's vision tower hands its projector a transformer's tokens and has no such step. Export needs "
            f"a ViT tower (CLIP, SigLIP, ...), or {_ALTERNATIVE}"
        )
    if getattr(model.vision.model.config, "patch_size", None) is None:
        raise ExportError(
            f"vision model {model.vision.model.config.model_type!r} has no patch_size; Llava counts image "
            f"tokens from it. {_ALTERNATIVE[0].upper() + _ALTERNATIVE[1:]}"
        )
    if type(model.connector) is not MLPConnector or model.connector.depth != 2:
        name = type(model.connector).__name__ + (
            f"(depth={model.connector.depth})" if isinstance(model.connector, MLPConnector) else ""
        )
        raise ExportError(
            f"connector {name} has no Llava counterpart: Llava's projector is exactly mlp2x_gelu "
            f"(linear_1 -> GELU -> linear_2). Train with model/connector=mlp2x_gelu, or {_ALTERNATIVE}"
        )
    if model.connector.token_norm is not None:
        raise ExportError(
            "the connector rescales its tokens to a fixed norm (model.visual_token_norm); Llava's projector has no "
            f"output normalisation, so an export would answer differently from the trained model. {_ALTERNATIVE[0].upper() + _ALTERNATIVE[1:]}"
        )
    if getattr(model.vision, "artifact_filter", None) is not None:
        raise ExportError(
            "the tower's outlier tokens are filtered (model.vision_artifacts); Llava's vision tower has no such step, "
            f"so an export would see other features than the trained model. {_ALTERNATIVE[0].upper() + _ALTERNATIVE[1:]}"
        )
    transform = head_transform(model.llm.config)
    if not transform.plain:
        raise ExportError(
            f"the LLM transforms its head's logits (scale {transform.scale:g}, soft-cap {transform.softcap}, from its "
            "config), which alignlm applies and transformers' "
            "Llava drops (its logits are lm_head's output): an export would score and sample otherwise. "
            f"{_ALTERNATIVE[0].upper() + _ALTERNATIVE[1:]}"
        )
    return feature_strategy(model.vision)


def llava_config(model: AlignLM, strategy: str) -> Any:
    """The ``LlavaConfig`` describing ``model``."""
    text_config = model.llm.config.to_dict()
    text_config["vocab_size"] = model.llm.get_input_embeddings().num_embeddings
    return LlavaConfig(
        vision_config=model.vision.model.config.to_dict(),
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",
        multimodal_projector_bias=model.connector.proj[0].bias is not None,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=model.vision.select_layer,
        tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)),
    )


def _pairs(model: AlignLM, hf: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, alignlm module, Llava module) whose state dicts correspond one to one."""
    return [
        ("vision tower", model.vision.model, hf.model.vision_tower),
        ("projector linear_1", model.connector.proj[0], hf.model.multi_modal_projector.linear_1),
        ("projector linear_2", model.connector.proj[2], hf.model.multi_modal_projector.linear_2),
        ("language model", model.llm.get_decoder(), hf.model.language_model),
        ("lm head", model.llm.get_output_embeddings(), hf.lm_head),
    ]


def _copy(src: nn.Module, dst: nn.Module, name: str) -> None:
    try:
        dst.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as e:
        raise ExportError(f"{name}: weights do not match the Llava layout: {e}") from e


def to_llava(model: AlignLM) -> Any:
    """An in-memory ``LlavaForConditionalGeneration`` with ``model``'s weights (LoRA must be merged already), built in
    the LLM's dtype: built in float32 and then cast, a bf16 model's export had held twice its size at once."""
    strategy = check_exportable(model)
    config = llava_config(model, strategy)
    hf = AutoModelForImageTextToText.from_config(config, dtype=model.llm.get_input_embeddings().weight.dtype)
    for name, src, dst in _pairs(model, hf):
        _copy(src, dst, name)
    hf.tie_weights()
    return hf.eval()


def llava_processor(model: AlignLM, template: Any, strategy: str, aspect_ratio: str = "pad") -> Any:
    """A ``LlavaProcessor`` whose image preprocessing and chat template are the ones the model was trained with;
    ``aspect_ratio``: its stage's ``data.image_aspect_ratio`` (``data/images.py: preprocess``), ``pad`` (Llava's
    ``do_pad``: the mean colour, then a square resize) or ``crop`` (the processor's own shorter-side resize and centre
    crop, as CLIP's)."""
    # imported here: on a machine without torchvision, importing it prints a warning on every alignlm command
    from transformers import LlavaImageProcessor  # noqa: PLC0415

    spec = model.image_spec
    pad = check_aspect_ratio(aspect_ratio, "image_aspect_ratio") == "pad"
    image_processor = LlavaImageProcessor(
        do_pad=pad,
        do_resize=True,
        size={"height": spec.size, "width": spec.size} if pad else {"shortest_edge": spec.size},
        do_center_crop=not pad,
        crop_size={"height": spec.size, "width": spec.size},  # what its token-count API reads, crop or not
        resample=3,  # bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        do_convert_rgb=True,
    )
    cfg = model.vision.model.config
    n_tokens = selected_hidden(model.vision).shape[1]
    tokenizer = copy.deepcopy(model.tokenizer)  # the export may change its EOS (set_stop_tokens), never the model's
    # batched generation appends to every row's end, as alignlm's generate pads; init_kwargs is what is saved
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        num_additional_image_tokens=n_tokens - (cfg.image_size // cfg.patch_size) ** 2,
        vision_feature_select_strategy=strategy,
        image_token=IMAGE_TOKEN,
        chat_template=template.jinja(model.tokenizer),
    )


def model_card(cfg: Any, stage: str, summary: dict[str, Any] | None) -> str:
    """README.md of an export of ``stage``'s checkpoint: what was trained up to it, how, and how it scored, so the Hub
    page is self-explaining. ``summary``: the run's, whose evaluation is of the run's last stage's checkpoint."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    run = list(plain.get("run", []))
    trained = run[: run.index(stage) + 1] if stage in run else [stage]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [llava, alignlm]",
        "---",
        "",
        f"# {plain.get('run_name', 'alignlm model')}",
        "",
        "A LLaVA-style model trained with [alignlm](https://github.com/) and exported to transformers' "
        "`LlavaForConditionalGeneration` (LoRA adapters merged).",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "model = LlavaForConditionalGeneration.from_pretrained(PATH)",
        "processor = AutoProcessor.from_pretrained(PATH, backend='pil')  # PIL's bicubic resize, as in training",
        "messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What is shown?'}]}]",
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        "```",
        "",
        "## Stages",
        "",
        "| stage | parts (vision / connector / llm) | lr | steps | objectives | template |",
        "|---|---|---|---|---|---|",
    ]
    for name in trained:
        st = plain["stages"][name]
        parts = " / ".join(str(st["parts"].get(p)) for p in ("vision", "connector", "llm"))
        lr = ", ".join(f"{k} {v:g}" for k, v in st.get("lr", {}).items() if st["parts"].get(k) != "frozen")
        objectives = ", ".join(f"{k} x{v.get('weight', 1)}" for k, v in (st.get("objectives") or {}).items())
        steps = st.get("max_steps") or f"{st.get('epochs')} epoch(s)"
        lines.append(f"| {name} | {parts} | {lr} | {steps} | {objectives} | {st['data']['template']} |")
    evals = (summary or {}).get("eval", {}) if run[-1:] == [stage] else {}
    if evals:
        lines += ["", "## Evaluation (alignlm)", "", "| set | n | accuracy | chance |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {v['n']} | {100 * v['accuracy']:.1f} % | {100 * v['chance']:.1f} % |" for k, v in evals.items()
        ]
    lines += ["", "## alignlm config", "", "```yaml", config_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def set_stop_tokens(hf: Any, tokenizer: Any, template: Any) -> None:
    """Generation stops at the template's end of turn in every consumer: ``generation_config.eos_token_id`` lists it
    beside EOS (transformers' ``generate``), and the exported tokenizer's EOS is it (tools that stop on the tokenizer's
    EOS, such as lmms-eval). Without this a model trained with a chat template whose turns end in ``<|im_end|>`` but
    whose EOS is ``</s>`` never stops outside alignlm. Where turns end in plain text (``plain``: a newline), its token
    stops generation when the text is one token: ids cannot say more, and transformers' stop strings would need the
    tokenizer at every ``generate`` call."""
    end = turn_end(template, tokenizer)
    text = tokenizer.encode(end.text, add_special_tokens=False) if end.text else []
    ends = list(end.ids) or (text if len(text) == 1 else [])
    stops = sorted({tokenizer.eos_token_id, *ends} - {None})
    hf.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    if ends and ends[0] != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ends[0])


SOURCE_FILE = "alignlm_source.json"  # in an export: the checkpoint it was made from, as it was then


def checkpoint_source(final_dir: str | Path, known: Any = None) -> dict[str, Any]:
    """Which checkpoint an export is made from, as it is now: its resolved path, the size and modification time (ns)
    of each file the export reads of it, and, under ``model files``, those and the SHA-256 of every file of each local
    file or folder its model config loads (``models.io.model_stamps``: a ``final/`` holds only the parts its run
    trained, the frozen LLM or tower is rebuilt from its folder, so new weights there had left an export of the old
    ones "current"; digested, so a byte-identical copy of that folder, ``cp -r`` to node-local disk, leaves it
    current). An export records it (``SOURCE_FILE``) so that ``alignlm export --is-current`` (scripts/eval_lmms.sh)
    tells an export of this checkpoint as it is from one of another checkpoint, or of this one before it was trained
    again: an export folder reused for several checkpoints scored the first one for all. The checkpoint's own files
    are not digested: that reads all of them (28 GB for a 7B model in fp32) at every check, where writing them again
    changes their modification time anyway; a frozen folder's are, once per process (``models.io.model_file_stamps``:
    about 25 s for a 7B LLM's on the 2-core builder; ``known``, a record's ``model files``, serves the digests of the
    files unchanged since, unread). A checkpoint whose model config names no local file records no ``model files``,
    as an export made before they were recorded did."""
    final = Path(final_dir).resolve()
    files = {}
    for name in FINAL_FILES:  # what the export reads
        stat = (final / name).stat()
        files[name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    loaded = model_stamps(load_checkpoint_config(final / "config.yaml").get("model"), known)
    return {"checkpoint": str(final), "files": files} | ({MODEL_FILES: loaded} if loaded else {})


def export(
    final_dir: str | Path, out_dir: str | Path, allow_code: bool = False, trust_remote_code: bool = False
) -> Path:
    """``alignlm export``: a ``final/`` checkpoint -> a transformers Llava directory (config, weights, processor, card)."""
    final_dir, out_dir = Path(final_dir), Path(out_dir)
    check_out_dir(final_dir, out_dir)
    # taken before the weights are read: a checkpoint written again while it is exported differs from its record
    source = checkpoint_source(final_dir)
    model = load_model(final_dir, allow_code, trust_remote_code)
    cfg = load_checkpoint_config(final_dir / "config.yaml")
    hf = to_llava(model)  # raises ExportError before anything is written
    # the template of the stage that trained this final/, as `alignlm eval` and `--check` prompt it (a pretrain final/
    # of a two-stage run was exported with the finetune stage's template)
    stage = checkpoint_stage(cfg, final_stage(final_dir))
    data = cfg.stages[stage].data
    args = data.get("template_args")
    template = get_template(data.template, **(OmegaConf.to_container(args, resolve=True) if args else {}))
    processor = llava_processor(model, template, hf.config.vision_feature_select_strategy, aspect_ratio_of(data))
    set_stop_tokens(hf, processor.tokenizer, template)
    summary_file = final_dir.parent.parent / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    # written beside, then swapped in: an interrupted export leaves no half folder, and a re-export keeps nothing of
    # the old one (an export_check.json of other weights); a failed one leaves nothing of its own behind
    tmp = temporary_path(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        hf.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(cfg, stage, summary), encoding="utf-8")
        (tmp / "alignlm_config.yaml").write_text(config_yaml(cfg), encoding="utf-8")
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_out_dir(final_dir: Path, out_dir: Path) -> None:
    """The export's folder may replace only an earlier export (or an empty folder), and never holds or lies inside
    the checkpoint: ``alignlm export FINAL FINAL`` wrote Llava's weights over alignlm's."""
    if out_dir.is_symlink():
        raise ExportError(
            f"the output {out_dir} is a symbolic link (to {os.readlink(out_dir)}); name the folder itself: the export "
            "replaces its output as a whole"
        )
    final, out = final_dir.resolve(), out_dir.resolve()
    if out == final or final in out.parents or out in final.parents:
        raise ExportError(
            f"the output folder {out_dir} {'is' if out == final else 'overlaps'} the checkpoint {final_dir}"
        )
    if out.is_file():
        raise ExportError(f"the output {out_dir} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "alignlm_config.yaml").exists():
        raise ExportError(f"{out_dir} exists and is not an earlier alignlm export; name a new or empty folder")


def is_llava_dir(path: str | Path) -> bool:
    """True for a transformers Llava checkpoint folder (``config.json`` with ``model_type: llava``)."""
    config = Path(path) / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") == "llava"


def load_llava_weights(model: AlignLM, path: str | Path) -> None:
    """Copy a transformers Llava checkpoint's weights into ``model`` (``init_from`` a Llava folder).

    Loading through ``LlavaForConditionalGeneration.from_pretrained`` accepts every key layout transformers
    accepts (including checkpoints converted before its 2025 renaming); the folder's weights file must hold exactly
    the weights of its ``config.json`` (``check_loading_info``), their shapes must match ``model``'s config, and every
    weight must be finite (as ``final/`` weights must). A folder whose ``config.json`` names Hub kernels as its attention
    is refused before transformers reads it (``refuse_hub_kernel_attention``).
    """
    refuse_hub_kernel_attention(str(path))
    hf, info = LlavaForConditionalGeneration.from_pretrained(
        str(path),
        dtype=model.llm.get_input_embeddings().weight.dtype,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # listed in ``info`` and refused below, naming the folder
    )
    check_loading_info(hf, info, path)
    strategy = check_exportable(model)
    want = {
        "vision_feature_select_strategy": strategy,
        "vision_feature_layer": model.vision.select_layer,
        "image_token_index": model.image_token_id,
    }
    wrong = {k: (getattr(hf.config, k), v) for k, v in want.items() if getattr(hf.config, k) != v}
    if wrong:
        raise ValueError(
            f"init_from={path}: the Llava config disagrees with model config (Llava value, ours): {wrong}; "
            "build the model with model=llava_hf model.path=<that folder>"
        )
    check_finite(hf.state_dict(), f"the Llava folder {path}")
    for name, dst, src in _pairs(model, hf):
        try:
            dst.load_state_dict(src.state_dict(), strict=True)
        except RuntimeError as e:
            raise ValueError(f"init_from={path}: {name} does not fit the model config: {e}") from e
    model.llm.tie_weights()


def check_loading_info(hf: nn.Module, info: dict[str, Any], path: str | Path) -> None:
    """Refuse a Llava folder whose weights file does not hold exactly the weights of its ``config.json``:
    ``from_pretrained`` fills a missing weight with random values and passes over one it has no place for. A weight
    missing because it is tied to one that arrived (a tied ``lm_head``) is no loss."""
    state = hf.state_dict()
    missing = set(info["missing_keys"])
    arrived = {state[k].data_ptr() for k in state if k not in missing}
    missing = sorted(k for k in missing if k not in state or state[k].data_ptr() not in arrived)
    problems = [
        f"{name} {sorted(keys)[:5]} ({len(keys)} in all)"
        for name, keys in (
            ("it lacks the weights", missing),
            ("it holds weights the model has no place for", [str(k) for k in info["unexpected_keys"]]),
        )
        if keys
    ]
    problems += [
        f"weight {key} has shape {list(saved)} where its config.json makes {list(wanted)}"
        for key, saved, wanted in sorted(info["mismatched_keys"])[:5]
    ]
    problems += [str(e) for e in info["error_msgs"]]
    if problems:
        raise ValueError(
            f"init_from={path}: the Llava folder's weights do not match its config.json: {'; '.join(problems)}; "
            "nothing was loaded"
        )


def vision_from_llava(path: str) -> HFVisionTower:
    """The vision tower a Llava folder describes (random weights; ``init_from`` the folder loads them)."""
    cfg = llava_folder_config(path)
    vc = cfg.vision_config
    tower = HFVisionTower(
        config={"model_type": vc.model_type, **_own_fields(vc)},
        select_layer=cfg.vision_feature_layer,
        select_feature="patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch",
        registers="keep",  # Llava keeps every prefix token or drops only CLS; it never drops registers alone
        **_image_norm(path),
    )
    if feature_strategy(tower) != cfg.vision_feature_select_strategy:  # "default" drops one token, "patch" the prefix
        raise ConfigError(
            f"{path}: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} drops the first token of "
            f"a {vc.model_type} tower, which has {'no class token' if tower.num_patches == tower._grid() ** 2 else 'other prefix tokens'}: "
            "alignlm keeps or drops the prefix tokens as a whole, so it cannot compute this model"
        )
    return tower


def llm_from_llava(path: str, chat_template: str | None = None) -> tuple[nn.Module, Any]:
    """The causal LM and tokenizer a Llava folder describes (random weights; ``init_from`` the folder loads them);
    ``chat_template`` as ``model.llm.chat_template`` of any LLM (``models/llm.py``)."""
    cfg = llava_folder_config(path)
    llm = AutoModelForCausalLM.from_config(cfg.text_config)
    return llm, with_chat_template(AutoTokenizer.from_pretrained(path), chat_template)


def llava_folder_config(path: str) -> Any:
    """A Llava folder's config, refused (naming the field) where alignlm's parts would compute something else: the
    projector's activation and bias, one vision feature layer (not a list of them); or where it names Hub kernels as
    its attention, code transformers would download and run when it builds a part (``refuse_hub_kernel_attention``)."""
    if not is_llava_dir(path):
        raise ConfigError(
            f"model.path={path!r} is not a transformers Llava folder (a config.json with model_type llava)"
        )
    refuse_hub_kernel_attention(path)
    cfg = AutoConfig.from_pretrained(path)
    problems = []
    if cfg.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act={cfg.projector_hidden_act!r} (the connector uses exact GELU)")
    if not getattr(cfg, "multimodal_projector_bias", True):
        problems.append("multimodal_projector_bias=false (the connector's linear layers have biases)")
    if not isinstance(cfg.vision_feature_layer, int):
        problems.append(f"vision_feature_layer={cfg.vision_feature_layer!r} (the tower gives one layer's features)")
    if problems:
        raise ConfigError(f"{path}: alignlm cannot compute this Llava model: {'; '.join(problems)}")
    return cfg


def _own_fields(config: Any) -> dict[str, Any]:
    """A sub-config's own fields, without the generic keys ``AutoConfig.for_model`` sets itself."""
    skip = {"model_type", "transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"}
    return {k: v for k, v in config.to_dict().items() if k not in skip}


def _image_norm(path: str) -> dict[str, Any]:
    """The mean/std the Llava folder's image processor normalises with, if it has one (``models/vision.py:
    saved_image_norm``: 3 finite numbers each, the std's above 0). A processor that crops the centre is said in a
    warning: alignlm squares a stage's images by its ``data.image_aspect_ratio`` (pad in finetuning, as LLaVA-1.5)."""
    found, _ = saved_image_processor(path)
    if found.get("do_center_crop") and not found.get("do_pad"):
        logging.getLogger("alignlm").warning(
            "%s: its image processor resizes and crops the centre; alignlm makes a stage's images square by its "
            "data.image_aspect_ratio (pad in finetuning, with the mean colour, as LLaVA-1.5 trained; crop as this "
            "processor does): with pad its pixels (and answers) differ from transformers' own preprocessing of this "
            "folder",
            path,
            extra=ALIKE_ON_EVERY_RANK,
        )
    return {key: list(value) for key, value in saved_image_norm(path).items()}
