"""Weight files of parts of an ``AlignLM``: save, load strictly, and rebuild a model from ``final/``.

Lives with the models (not the trainer) so evaluation and export reload a checkpoint with no training code.

A checkpoint is data, never code. Rebuilding one from its ``config.yaml`` builds only alignlm's own part classes
and loaders (vision towers, connectors, extra input parts, LLM loaders), checked by name *before* anything is
imported; any other ``_target_`` (a user's own connector, ``builtins.open``, ...) is refused unless the caller
passes ``allow_code=True`` (``--allow-code``). ``trust_remote_code`` in a checkpoint's config is ignored: it is on
only when the caller sets it (``--trust-remote-code``), and neither is an ``attn_implementation`` naming a Hub
repository of kernels. Its ``config.yaml`` is read without YAML anchors or aliases and without interpolations
(``read_config_yaml``, ``load_checkpoint_config``): alignlm writes neither (``config_yaml``).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra._internal.utils import _locate
from omegaconf import DictConfig, OmegaConf
from omegaconf._utils import get_yaml_loader
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from omegaconf.grammar_parser import parse
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from alignlm.data.build import image_reading_of
from alignlm.data.images import ImageReading
from alignlm.files import file_sha256, refuse_special_file
from alignlm.models.build import build_model
from alignlm.models.connectors.base import Connector
from alignlm.models.extras import InputPart
from alignlm.models.loading import check_finite
from alignlm.models.vision import VisionTower

# the key under which a record (a step checkpoint's recipe, trained_from.json, an export's source) holds model_stamps
MODEL_FILES = "model files"
# file_digest's memo: (absolute path, bytes, modification time (ns), inode) -> the file's SHA-256
_DIGESTS: dict[tuple[str, int, int, int], str] = {}
PART_BASES = (VisionTower, Connector, InputPart)  # alignlm classes of these kinds may be built from a checkpoint
FINAL_FILES = ("config.yaml", "model.safetensors")  # what load_model reads of a final/ folder
PART_PACKAGES = ("alignlm.models.", "alignlm.methods.")  # where they live: nothing else is imported to tell
LOADERS = {  # and these functions, which return parts
    f"alignlm.models.llm.{name}" for name in ("pretrained", "tiny", "smollm2_from_package")
} | {f"alignlm.export.hf_llava.{name}" for name in ("vision_from_llava", "llm_from_llava")}


class UnsafeConfigError(ValueError):
    """A checkpoint's config names code alignlm does not build on its own authority, or holds what alignlm never
    writes and what would run (an interpolation) or explode (a YAML alias) when read."""


_INTERPOLATION_START = re.compile(r"(\\*)\$\{")  # "${" and the backslashes right before it


def config_yaml(cfg: DictConfig) -> str:
    """A config resolved, as YAML that loads back to the same values and holds no interpolation, anchor or alias.

    A literal ``${`` in a value (a prompt that shows one), which ``OmegaConf.to_yaml(resolve=True)`` leaves bare, is
    escaped as OmegaConf's grammar reads it back (``_escape``). The tree is rebuilt node by node, so no list or
    mapping object appears twice and YAML writes no anchor (``read_config_yaml`` refuses them)."""

    def escape(node: Any) -> Any:
        if isinstance(node, str):
            return _escape(node)
        if isinstance(node, dict):
            return {k: escape(v) for k, v in node.items()}
        if isinstance(node, list):
            return [escape(v) for v in node]
        return node

    return OmegaConf.to_yaml(OmegaConf.create(escape(OmegaConf.to_container(cfg, resolve=True))))


def _escape(text: str) -> str:
    """``text`` written so that OmegaConf reads it back as itself. In a value holding ``${`` OmegaConf reads
    ``\\${`` as a literal ``${`` and halves the backslashes before it (``\\\\${`` is one backslash, then a live
    interpolation): each ``${`` gets a backslash, and those before it are doubled. A value without ``${`` is read
    verbatim, backslashes and all."""
    return _INTERPOLATION_START.sub(lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", text)


class _NoAliasLoader(get_yaml_loader()):  # type: ignore[misc]
    """OmegaConf's own YAML loader (its float syntax; duplicate keys refused) that refuses anchors and aliases: an
    alias repeats its anchor's node wherever it is named, so a few hundred bytes of nested aliases expand into
    billions of values ("billion laughs") before OmegaConf sees them."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.keys: list[str] = []  # the config key of the node being composed, one entry per level

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """Compose one node, refusing it if it is an alias or carries an anchor, naming its config key."""
        step = [] if index is None else [f"[{index}]" if isinstance(index, int) else f".{getattr(index, 'value', '?')}"]
        self.keys += step
        try:
            event = self.peek_event()
            if event.anchor is not None:
                what = f"alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{event.anchor}"
                raise UnsafeConfigError(
                    f"{event.start_mark.name}, line {event.start_mark.line + 1}: "
                    f"{''.join(self.keys).lstrip('.') or 'the top level'} holds the YAML {what}; alignlm writes "
                    "none, and an alias repeats a node wherever it is named (a few hundred bytes of nested aliases "
                    "grow into billions of values): refused, the file was edited"
                )
            return super().compose_node(parent, index)
        finally:
            del self.keys[len(self.keys) - len(step) :]


def read_config_yaml(path: str | Path) -> DictConfig:
    """A config file alignlm did not compose itself (a checkpoint's ``config.yaml``), read as ``OmegaConf.load`` reads
    it but with YAML anchors and aliases refused (``_NoAliasLoader``), so reading it takes time in proportion to its
    size. Interpolations are left as they are: ``load_checkpoint_config`` refuses them. Only a regular file is opened:
    a FIFO blocked the reader (and every ``eval``/``export`` of the folder) for ever, a device never ended."""
    refuse_special_file(path)
    with open(path, encoding="utf-8") as f:
        plain = yaml.load(f, Loader=_NoAliasLoader)  # a SafeLoader: plain YAML types only
    if not isinstance(plain, dict):
        raise ValueError(f"{path} holds {type(plain).__name__}, not a mapping of config keys")
    return OmegaConf.create(plain)


def load_checkpoint_config(path: str | Path) -> DictConfig:
    """A checkpoint's ``config.yaml``, which alignlm writes resolved (``config_yaml``). An interpolation in it was
    written by someone else and would run when read (``${oc.env:...}`` reads the environment into an export's model
    card): refused, naming the key, as are YAML anchors and aliases (``read_config_yaml``)."""
    cfg = read_config_yaml(path)

    def find(node: Any, key: str) -> tuple[str, str] | None:
        if isinstance(node, str):
            return (key, node) if _holds_interpolation(node) else None
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        return next((found for k, v in items if (found := find(v, f"{key}.{k}" if key else str(k)))), None)

    bad = find(OmegaConf.to_container(cfg, resolve=False), "")
    if bad is not None:
        raise UnsafeConfigError(
            f"{path}: {bad[0]} holds the interpolation {bad[1]!r}; alignlm writes checkpoint configs resolved, so this "
            "one was edited: refused (a checkpoint is data)"
        )
    return cfg


def _holds_interpolation(text: str) -> bool:
    """Whether OmegaConf would resolve something in a value ``text`` of a config it created (and so parsed already),
    as its own grammar parses it: ``\\${`` is text, ``\\\\${`` an escaped backslash and then a live interpolation."""
    if "${" not in text:  # OmegaConf's own test: it parses nothing else
        return False

    def live(node: Any) -> bool:
        if isinstance(node, OmegaConfGrammarParser.InterpolationContext):
            return True
        return any(live(node.getChild(i)) for i in range(node.getChildCount()))  # a token has no children

    return live(parse(text))


def safe_model_config(node: Any, allow_code: bool = False, trust_remote_code: bool = False) -> DictConfig:
    """A copy of a ``model`` config node fit to build: every ``_target_`` and ``attn_implementation`` checked, every
    ``trust_remote_code`` set to the caller's choice. Raises ``UnsafeConfigError`` naming the key otherwise."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    _check_targets(plain, "model", allow_code, trust_remote_code)
    return OmegaConf.create(plain)


def _check_targets(node: Any, key: str, allow_code: bool, trust_remote_code: bool) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_targets(item, f"{key}[{i}]", allow_code, trust_remote_code)
        return
    if not isinstance(node, dict):
        return
    if "trust_remote_code" in node:
        node["trust_remote_code"] = trust_remote_code
    if not allow_code:
        _check_attention(node.get("attn_implementation"), f"{key}.attn_implementation")
    target = node.get("_target_")
    if target is not None and not allow_code and not _is_part_builder(str(target)):
        raise UnsafeConfigError(
            f"{key}._target_={target!r} is not one of alignlm's part classes or loaders, and a checkpoint is data, "
            "never code: rebuild it with allow_code=True (--allow-code) only if you trust where it came from"
        )
    for k, v in node.items():
        _check_targets(v, f"{key}.{k}", allow_code, trust_remote_code)


def _check_attention(value: Any, key: str) -> None:
    """Refuse an ``attn_implementation`` other than null or a built-in's name: transformers downloads and runs a Hub
    repository's kernels for ``"<org>/<repo>"`` without asking for trust_remote_code, and for such a name in a
    mapping per sub-config too (``{"": "<org>/<repo>"}``), which alignlm's loaders (one name or null) never need."""
    if value is None or (isinstance(value, str) and "/" not in value):
        return
    what = (
        "names a Hub repository of kernels, code transformers would download and run"
        if isinstance(value, str)
        else f"is a {type(value).__name__}, not the name of a built-in attention (transformers reads a mapping per "
        "sub-config, whose values may name Hub kernels, code it would download and run)"
    )
    raise UnsafeConfigError(
        f"{key}={value!r} {what}; a checkpoint is data, never code: rebuild it with allow_code=True (--allow-code) "
        "only if you trust where it came from, or set a built-in attention (sdpa, eager, flash_attention_2, ...)"
    )


def _is_part_builder(target: str) -> bool:
    """Whether ``target`` names an alignlm part class or loader. Only a name under ``PART_PACKAGES`` made of public
    components, none of them a ``commands`` module, is imported to tell: importing a module runs it, and
    ``alignlm.commands.__main__`` ran the command line with the caller's arguments."""
    if target in LOADERS:
        return True
    names = target.split(".")
    if not target.startswith(PART_PACKAGES) or "commands" in names:
        return False
    if not all(name.isidentifier() and not name.startswith("_") for name in names):
        return False
    try:
        obj = _locate(target)
    except ImportError:
        return False
    return inspect.isclass(obj) and issubclass(obj, PART_BASES) and obj.__module__.startswith("alignlm.")


def _unique_state(
    module: nn.Module,
    prefix: str,
    keep: set[str] | None,
    state: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage); ``keep``: the full names to save
    (None: all); ``state``: the part's whole state when the module's own tensors are shards (FSDP2), keyed as
    ``module.state_dict()``."""
    seen: set[int] = set()
    out = {}
    for name, t in (state if state is not None else module.state_dict()).items():
        if keep is not None and prefix + name not in keep:
            continue
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        # a part's own tensors are copied (the model trains on); a gathered state is a fresh CPU copy already (FSDP2:
        # copied again, rank 0 held the trained weights four times over at a step checkpoint, 112 GB at 7B)
        out[prefix + name] = t.detach().to("cpu", copy=state is None).contiguous()
    return out


def trained_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of every part that is not frozen (``model.frozen_parts``), by full name: they change as
    their part trains though no gradient reaches them (BatchNorm's running statistics and count of batches move with
    every forward in training mode), so a step checkpoint holds them beside the trainable parameters. A frozen part
    stays in eval mode (``AlignLM.train``) and keeps its buffers as its starting weights gave them."""
    frozen = getattr(model, "frozen_parts", set())
    out = {}
    for part in (p for p in getattr(model, "PARTS", ()) if p not in frozen):  # a plain module has no parts
        module = getattr(model, part)
        persistent = set(module.state_dict())  # a buffer registered persistent=False is rebuilt, never saved
        out |= {f"{part}.{n}": b for n, b in module.named_buffers() if n in persistent}
    return out


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a step checkpoint holds of the model (:func:`part_state` with ``only_trainable``), by full name: the
    parameters that train (one name of a tied pair, as ``named_parameters`` gives it) and :func:`trained_buffers`."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad} | trained_buffers(model)


def part_state(
    model: nn.Module,
    parts: Iterable[str],
    only_trainable: bool = False,
    state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Weights of the named parts, keyed ``part.param``; from ``state`` (the model's whole state dict) when given.
    ``only_trainable``: what a step checkpoint holds of them, what the stage changes (:func:`trained_tensors`): the
    parameters that train and the buffers of the parts that are not frozen."""
    keep = set(trained_tensors(model)) if only_trainable else None
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        sub = None if state is None else {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(f"{part}.")}
        out.update(_unique_state(getattr(model, part), f"{part}.", keep, sub))
    return out


def check_known_keys(state: Mapping[str, Any], model_state: Mapping[str, Any]) -> None:
    """Refuse weights the model has no place for (a checkpoint of another config), naming a few."""
    unknown = set(state) - set(model_state)
    if unknown:
        raise KeyError(
            f"checkpoint has weights the model lacks (was it built from another config?): {sorted(unknown)[:5]}"
        )


def load_part_state(
    model: nn.Module, state: dict[str, torch.Tensor], parts: Iterable[str], source: str = "the checkpoint"
) -> None:
    """Load part weights strictly: every key of these parts must arrive unless it is tied to one that did, each of
    the model's shape and kind and finite (``source`` names where they came from in an error).

    A part may define ``adapt_state(sub_state) -> sub_state`` to accept another layout of its weights (the MoE
    connector upcycles a dense connector's weights this way).
    """
    state = adapt_parts(model, state, parts)
    check_finite(state, source)
    full = model.state_dict()
    wanted = {k for k in full if k.split(".", 1)[0] in set(parts)}
    check_known_keys(state, full)
    check_fits(state, full, source)
    loaded_ptrs = {full[k].data_ptr() for k in state}
    missing = [k for k in wanted - set(state) if full[k].data_ptr() not in loaded_ptrs]
    if missing:
        raise KeyError(f"checkpoint lacks weights for {sorted(missing)[:5]} ({len(missing)} in all)")
    with torch.no_grad():
        for k, v in state.items():
            full[k].copy_(v)


def check_fits(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a weight of another shape or kind than the model's, naming it: ``copy_`` broadcast a ``[32]`` row over a
    ``[32, 32]`` matrix and cast integers and booleans into floating weights, so another config's weights loaded."""
    for k, v in state.items():
        own = model_state[k]
        if v.shape != own.shape:
            raise ValueError(
                f"weight {k} of {source} has shape {list(v.shape)} where the model's is {list(own.shape)} (was it "
                "built from another config?); nothing was loaded"
            )
        if not (v.dtype == own.dtype or (v.is_floating_point() and own.is_floating_point())):
            raise ValueError(
                f"weight {k} of {source} is {v.dtype} where the model's is {own.dtype} (a floating weight takes "
                "floating values, any other its own dtype; was it built from another config?); nothing was loaded"
            )


def adapt_parts(model: nn.Module, state: dict[str, torch.Tensor], parts: Iterable[str]) -> dict[str, torch.Tensor]:
    """Pass each part's weights through its ``adapt_state`` hook, if it has one."""
    state = dict(state)
    for part in parts:
        adapt = getattr(getattr(model, part, None), "adapt_state", None)
        if adapt is None:
            continue
        prefix = f"{part}."
        sub = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        state.update({prefix + k: v for k, v in adapt(sub).items()})
    return state


def _weights_header(weights: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A ``final/`` weights file's metadata and each tensor's dtype (safetensors' names, ``F32``, ``BF16``), read from
    its header; a file cut short or damaged is named (safetensors' own message, "header too small", names none)."""
    refuse_special_file(weights)
    try:
        with safe_open(str(weights), "pt") as f:
            return f.metadata() or {}, {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(
            f"{weights} cannot be read ({e}): the file is cut short or damaged (a full disk, a node lost while it was "
            "written); rerun the stage's training, which trains it again from its step checkpoints"
        ) from e


def wide_tensors(final_dir: Path) -> set[str]:
    """The tensors a ``final/`` holds in float32 (``save_final`` keeps the parts a stage trained so), by full name."""
    return {k for k, dtype in _weights_header(Path(final_dir) / "model.safetensors")[1].items() if dtype == "F32"}


def wide_parts(final_dir: Path) -> set[str]:
    """The parts a ``final/`` holds weights of in float32."""
    return {k.split(".", 1)[0] for k in wide_tensors(final_dir)}


def final_parts(final_dir: Path) -> list[str]:
    """Which parts a ``final/`` checkpoint carries: those its ``parts`` metadata names (``save_final`` always writes
    it), and any part it holds weights of. Each must then arrive whole (``load_part_state``), so a file without the
    metadata (re-saved with ``save_file``) is refused rather than loaded part by part over the built model's weights,
    and a part the metadata leaves out is still checked when the file holds some of its weights."""
    weights = final_dir / "model.safetensors"
    metadata, dtypes = _weights_header(weights)
    held = {k.split(".", 1)[0] for k in dtypes}
    if "parts" not in metadata:
        raise ValueError(
            f"{weights} has no 'parts' metadata, which alignlm writes with every final/ checkpoint to say which parts "
            "it holds whole; without it weights missing from the file would silently keep the built model's values. "
            "Save it again with save_file(..., metadata={'parts': 'connector,llm'}) naming the parts it holds"
        )
    declared = [p for p in metadata["parts"].split(",") if p]
    return declared + sorted(set(held) - set(declared))


def load_final_weights(model: nn.Module, final_dir: Path) -> list[str]:
    """Overlay a ``final/`` checkpoint's weights onto a freshly built model; returns the parts loaded."""
    weights = Path(final_dir) / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{final_dir} is not a final checkpoint (no model.safetensors)")
    parts = final_parts(Path(final_dir))
    load_part_state(model, load_file(str(weights)), parts, str(weights))
    return parts


def final_stage(final_dir: str | Path) -> str:
    """The stage that trained a ``final/``: the one its weights' metadata names (``save_final`` writes it), else the
    folder it sits in (a ``final/`` saved before the name was written). The folder alone says nothing once the run's
    outputs were set aside (``resume=never``: ``<stage>/before-<time>/final``) or the folder was copied elsewhere."""
    final_dir = Path(os.path.abspath(final_dir))
    stage = _weights_header(final_dir / "model.safetensors")[0].get("stage")
    return stage or final_dir.parent.name


def checkpoint_stage(cfg: DictConfig, stage: str) -> str:
    """The stage whose data config (template and its arguments) a checkpoint of the folder named ``stage`` was trained
    with: that stage where the run's config has one of that name, else the run's last (a folder renamed or copied out
    of its run), the way ``alignlm eval`` picks it (``evaluation/checkpoints.py: data_config``), so an export prompts a
    checkpoint as it was trained and as its evaluation does."""
    return stage if stage in cfg.stages else cfg.run[-1]


def final_image_reading(final_dir: str | Path) -> ImageReading:
    """How the stage that trained a ``final/`` read its images (its ``data.image_aspect_ratio``, ``pad`` for a config
    from before the setting, and its ``data.max_image_pixels``), so a tool reading images for the checkpoint
    (token-word accuracy, V2L's words) sees the pixels it was trained on: a pretraining checkpoint crops where a
    finetuned one pads."""
    cfg = load_checkpoint_config(Path(final_dir) / "config.yaml")
    return image_reading_of(cfg.stages[checkpoint_stage(cfg, final_stage(final_dir))].get("data") or {})


def load_model(final_dir: str | Path, allow_code: bool = False, trust_remote_code: bool = False) -> Any:
    """Rebuild a trained model from a ``final/`` folder: its saved config (checked, see the module docstring), then
    its weights."""
    final_dir = Path(final_dir)
    cfg = load_checkpoint_config(final_dir / "config.yaml")
    model = build_model(safe_model_config(cfg.model, allow_code, trust_remote_code))
    load_final_weights(model, final_dir)
    model.eval()
    return model


def config_strings(tree: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every string of a nested config (plain containers) with its key, into lists too (``data.sources[0].path``)."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from config_strings(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from config_strings(v, f"{prefix}[{i}]")
    elif isinstance(tree, str):
        yield prefix, tree


def file_stamps(path: str | Path) -> list[list[Any]]:
    """``[name, bytes, modification time (ns)]`` of a file, or of every file in a folder (below it too); [] for
    nothing there. A file rewritten, replaced or cut since changes them, without reading it (a 7B LLM's folder is
    14 GB); a copy that does not keep times counts as a change (not in a model folder: :func:`model_file_stamps`)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    return [[str(p), st.st_size, st.st_mtime_ns] for p in files for st in (p.stat(),)]  # one stat a file


def model_sources(model: Any) -> dict[str, str]:
    """``{model.<key>: absolute path}`` for every string of a ``model`` config that names a local file or folder (with
    a ``/``: a word such as ``auto`` or ``.`` is no model's folder, whatever the current folder holds). A ``final/``
    holds only the parts its run trained: a frozen LLM or tower is rebuilt from the folder its config names (and a
    part's own files, such as a prepare step's encoder, are read from theirs), so new weights there change the model
    under the same ``final/``. The one list of them that evaluation's kept results, ``alignlm export --is-current`` and
    a finished stage's skip compare (:func:`model_stamps`)."""
    if isinstance(model, DictConfig):
        model = OmegaConf.to_container(model, resolve=True)
    return {key: os.path.abspath(text) for key, text in config_strings(model or {}, "model") if _names_local(text)}


def _names_local(text: str) -> bool:
    """Whether a config string names a local file or folder (:func:`model_sources`' rule)."""
    return "/" in text and bool(text.strip("./")) and os.path.exists(text)


SMALL_FILE = 1 << 20  # bytes: a config, an image processor's settings, a vocabulary; not weights


def without_local_paths(tree: Any) -> Any:
    """``tree`` (plain containers) with each string that names a local file or folder (:func:`model_sources`' rule)
    replaced by the digest of its small files (names below it and bytes, each under ``SMALL_FILE``): what a cache key
    built from a config keeps of a model folder whose weights it hashes from the loaded module. The same files copied
    elsewhere (a cluster job copies its towers to node-local disk at every requeue) give the same key, and a config
    edited in place another."""
    if isinstance(tree, Mapping):
        return {k: without_local_paths(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [without_local_paths(v) for v in tree]
    if not isinstance(tree, str) or not _names_local(tree):
        return tree
    root = Path(tree)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        if file.stat().st_size < SMALL_FILE:
            digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}\0".encode())
            digest.update(file_sha256(file).encode())
    return f"<local files {digest.hexdigest()[:16]}>"


def model_stamps(model: Any, known: Any = None) -> dict[str, dict[str, Any]]:
    """``{model.<key>: {"path", "files"}}``: each of :func:`model_sources` with the :func:`model_file_stamps` of what
    is there now, as JSON reads it back (lists). ``known``: a record of the same form, whose digests serve the files
    of its name, size and time unread."""
    known = known if isinstance(known, Mapping) else {}

    def recorded(key: str) -> Any:
        return known[key].get("files") if isinstance(known.get(key), Mapping) else None

    return {
        key: {"path": path, "files": model_file_stamps(path, recorded(key))}
        for key, path in model_sources(model).items()
    }


def model_file_stamps(path: str | Path, known: Any = None) -> list[list[Any]]:
    """:func:`file_stamps` with each file's SHA-256 last, ``[name, bytes, modification time (ns), sha256]``, so that
    :func:`stamps_change` tells a byte-identical copy from new weights: cluster jobs copy a model folder to node-local
    disk with ``cp -r`` at every requeue (new modification times), and every resume and rerun was refused as if its
    files had changed. Cost: the files are read whole, once per process (memoised by absolute path, size,
    modification time and inode; ``step_recipe`` stamps them at every step checkpoint): SHA-256 read 1 GB in 1.8 s
    from the page cache on the 2-core builder (another job running), so about 25 s for a 7B LLM's 14 GB folder there,
    more from a cold disk. ``known``: a
    record's stamps of the same folder; a file of its name, size and modification time keeps its digest unread (the
    check that a resume's or a finished stage's files are unchanged reads nothing while they are)."""
    recorded = {s[0]: s for s in known if isinstance(s, list) and len(s) > 3} if isinstance(known, list) else {}
    stamps = []
    for name, size, mtime in file_stamps(path):
        old = recorded.get(name)
        if old is not None and old[1:3] == [size, mtime]:
            stamps.append([name, size, mtime, old[3]])
            continue
        stamps.append([name, size, mtime, file_digest(Path(name))])
    return stamps


def file_digest(file: Path) -> str:
    """``file``'s SHA-256, read once per process while its absolute path, size, modification time and inode stay the
    same (:func:`model_file_stamps`, ``checkpoint.start_weights``)."""
    st = file.stat()
    key = (os.path.abspath(file), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(file)
    return _DIGESTS[key]


def stamps_change(was: Any, now: Any) -> str | None:
    """How two stamp lists of one file or folder differ (a record's, as JSON reads it back, and this run's): None for
    the same files; ``"changed"`` for files added, gone, of another size, or of another digest where both sides hold
    one (then their modification times are not compared: a copy with the same bytes is the same files);
    ``"rewritten"`` for the same names and sizes whose modification times differ where a side holds no digest (a
    record written before :func:`model_file_stamps` kept them: a copy cannot be told from new bytes of the same
    size). The one comparison of model files: a resume, a finished stage's skip and ``alignlm export --is-current``."""
    theirs, ours = _by_name(was), _by_name(now)
    if theirs is None or ours is None or theirs.keys() != ours.keys():
        return "changed"
    pairs = [(theirs[name], ours[name]) for name in theirs]
    if any(a[1] != b[1] or (len(a) > 3 and len(b) > 3 and a[3] != b[3]) for a, b in pairs):
        return "changed"
    if any((len(a) < 4 or len(b) < 4) and a[2] != b[2] for a, b in pairs):
        return "rewritten"
    return None


def _by_name(stamps: Any) -> dict[str, list[Any]] | None:
    """A stamp list by file name; None for what is no stamp list (a record edited by hand): compared as changed."""
    if not isinstance(stamps, list) or not all(
        isinstance(s, list) and len(s) >= 3 and isinstance(s[0], str) for s in stamps
    ):
        return None
    return {s[0]: s for s in stamps}
