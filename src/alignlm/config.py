"""Config composition and object building: where the ``configs/`` tree is, how overrides compose, how a node builds.

The bottom layer beside ``constants``: every layer above builds its parts from config nodes with ``instantiate``,
and the commands compose the tree with ``compose``. Nothing here knows a model, a dataset or a method.
"""

from __future__ import annotations

import importlib.resources
import math
import numbers
import os
import types
import typing
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf, open_dict


class ConfigError(ValueError):
    """A value of the composed config that cannot work, found before anything is built; the message names the key
    and what it may be (``alignlm train`` prints it without a traceback)."""


def is_finite(value: numbers.Real) -> bool:
    """``math.isfinite``, where a whole number past any float's range (``10**400``) is not finite: no computation takes
    it, and ``math.isfinite`` raises an OverflowError that names no knob."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class Bounds:
    """The values a number knob takes: finite, at least ``low`` (above it where ``low_open``), at most ``high``.
    Written once, beside the argument it bounds (``k: Annotated[int, Bounds(1)] = 5``), and read by each check of
    that knob: the start-up checks of a recipe (``checks.check_knob_types``), before the prepare steps and stages
    before it have run; a command-line flag of the same knob (``commands/_flags``); the code that uses it
    (:meth:`check`). A prepare step's bad value had been refused only when that step ran, after the work before it."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False

    def __str__(self) -> str:
        """``> 0``, ``>= 2``, ``in (0, 1]``: what follows "a finite number" in a message."""
        if self.high < math.inf:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return f"{'>' if self.low_open else '>='} {self.low:g}"

    def holds(self, value: Any, whole: bool = False) -> bool:
        """``value`` is a number (a whole one where ``whole``; never a bool or a string) within the bounds."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return is_finite(value) and above and value <= self.high

    def problem(self, value: Any, whole: bool = False) -> str | None:
        """What is wrong with ``value`` (``must be a whole number >= 2``), or None where it holds."""
        if self.holds(value, whole):
            return None
        return f"must be a {'whole' if whole else 'finite'} number {self}"

    def check(self, key: str, value: Any, whole: bool = False, note: str = "") -> None:
        """Refuse ``value`` of the knob ``key`` (a ValueError naming both) unless it holds."""
        problem = self.problem(value, whole)
        if problem:
            raise ValueError(f"{key}={value!r} {problem}{note}")


POSITIVE = Bounds(0, low_open=True)  # a temperature, a scale, a rate: finite and above 0
COUNT = Bounds(1)  # a number of iterations, candidates, items: a whole number of at least one (``whole=True``)
SHARE = Bounds(0, 1, low_open=True)  # a share of a whole: nucleus sampling's top_p


@dataclass(frozen=True)
class KnobsOf:
    """A mapping knob that holds keyword arguments of ``target`` (``fit: Annotated[dict | None, KnobsOf(fit)]``): the
    start-up checks check its keys, types and bounds as they check a step's own knobs. ``supplied``: the arguments
    the step passes itself (a fit's ``out``), which the mapping may not set."""

    target: Callable[..., Any]
    supplied: tuple[str, ...] = ()


def knob_annotations(target: Any) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """Each annotated argument of the function ``target`` (of its constructor, a class): its type and the metadata
    of ``Annotated[type, ...]`` (``Bounds``, ``KnobsOf``; none for a plain annotation). Empty where an annotation
    does not resolve: nothing to check by it."""
    try:
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target, include_extras=True)
    except Exception:  # noqa: BLE001 - an annotation this module cannot resolve
        return {}
    hints.pop("return", None)
    return {
        knob: (typing.get_args(hint)[0], typing.get_args(hint)[1:])
        if typing.get_origin(hint) is typing.Annotated
        else (hint, ())
        for knob, hint in hints.items()
    }


def check_bounds(target: Any, values: Mapping[str, Any], where: str = "") -> None:
    """Each of ``values`` (an argument of ``target`` -> its value; None passes) within the ``Bounds`` its annotation
    declares (a whole number where annotated ``int``), else a ValueError naming ``where`` + the argument: the check
    of the code that takes them, for callers the start-up checks never saw (the command line, Python)."""
    for knob, (hint, extras) in knob_annotations(target).items():
        value = values.get(knob)
        for bounds in (e for e in extras if isinstance(e, Bounds)):
            if value is not None:
                bounds.check(f"{where}{knob}", value, whole=int in union_args(hint))


def union_args(hint: Any) -> tuple[Any, ...]:
    """``(int, NoneType)`` of ``int | None``; ``(int,)`` of ``int``."""
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def config_dir() -> Path:
    """The config tree: ``$ALIGNLM_CONFIG_DIR``, else ``configs/`` of the source checkout. A variable naming no tree
    (a typo, or a plug-in's ``conf/`` folder, which holds only its own files) is refused: it had fallen back to the
    checkout's tree without a word, training what the user meant to replace."""
    env = os.environ.get("ALIGNLM_CONFIG_DIR")
    if env:
        tree = Path(env)
        if (tree / "train.yaml").is_file():
            return tree
        problem = "has no train.yaml" if tree.is_dir() else "is not a folder" if tree.exists() else "does not exist"
        raise ConfigError(
            f"ALIGNLM_CONFIG_DIR={env} {problem}: it replaces the whole config tree, so it names a copy of configs/ "
            "(train.yaml at its top); a folder of only your own configs joins the tree with "
            "hydra.searchpath=[file:///path/to/conf] instead (README, Extending), or unset the variable"
        )
    tree = Path(__file__).resolve().parents[2] / "configs"
    if not (tree / "train.yaml").is_file():
        raise FileNotFoundError(f"no train.yaml in {tree}: set ALIGNLM_CONFIG_DIR=/path/to/configs")
    return tree


def compose(overrides: Sequence[str], config_name: str = "train") -> DictConfig:
    """The training config for these Hydra overrides (resolved on access). Where Hydra found its files (the tree and
    every ``hydra.searchpath`` folder, :func:`config_roots`) is remembered with it: Hydra's own node, which says so,
    is left out of the config, as Hydra's ``compose`` leaves it out. An override of Hydra's other settings is refused:
    nothing reads them (``hydra.run.dir=...`` had been accepted, and the outputs went to ``output_dir`` all the
    same)."""
    for override in overrides:
        key = _override_key(override)
        if (key == "hydra" or key.startswith(("hydra.", "hydra/"))) and key != "hydra.searchpath":
            raise ConfigError(
                f"{override}: alignlm composes its config with Hydra's compose API and runs no Hydra app, so Hydra's "
                "own settings (hydra.run.dir, hydra.job.*, hydra.verbose, its logging and launcher groups) do nothing "
                "(outputs go to output_dir/run_name); only hydra.searchpath is read: drop it"
            )
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="alignlm"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    roots = tuple(_source_folders(cfg.hydra.runtime.config_sources))
    with open_dict(cfg):
        del cfg["hydra"]
    key = id(cfg)
    _ROOTS[key] = (weakref.ref(cfg, lambda _: _ROOTS.pop(key, None)), roots, tuple(overrides))
    return cfg


# The folders each config ``compose`` returned was read from, and the overrides it was composed with, by the config's
# identity (its weak reference tells a config from a later one at the same address; the entry goes with the config).
_ROOTS: dict[int, tuple[weakref.ref, tuple[Path, ...], tuple[str, ...]]] = {}


def _source_folders(sources: Any) -> list[Path]:
    """The folders of Hydra's config sources that hold files: ``file://`` folders and ``pkg://`` packages on disk
    (Hydra's own configs and structured configs hold no alignlm settings)."""
    folders = []
    for source in sources:
        if source.schema == "file":
            folders.append(Path(source.path))
        elif source.schema == "pkg" and source.provider != "hydra":
            try:
                folder = Path(str(importlib.resources.files(source.path.replace("/", "."))))
            except ModuleNotFoundError:  # Hydra found nothing there either
                continue
            if folder.is_dir():
                folders.append(folder)
    return folders


def composed(cfg: DictConfig | None) -> bool:
    """Whether ``cfg`` is a config :func:`compose` returned (its folders known), not a copy or merge of one."""
    entry = _ROOTS.get(id(cfg))
    return cfg is not None and entry is not None and entry[0]() is cfg


def config_roots(cfg: DictConfig | None = None) -> list[Path]:
    """The config folders ``cfg`` was composed from: the tree (``config_dir()``) and every ``hydra.searchpath``
    folder, where a plug-in keeps its configs outside the repository (only the tree for a config ``compose`` did not
    return, or for none)."""
    return list(_ROOTS[id(cfg)][1]) if composed(cfg) else [config_dir()]


def overridden_keys(cfg: DictConfig | None) -> list[str]:
    """The keys the overrides ``cfg`` was composed with set (``stages.finetune.lora.r`` of
    ``stages.finetune.lora.r=64``, ``model`` of ``model=tiny``), in their order; none for a config ``compose`` did not
    return. What the user asked for by name, as against what a recipe or a default sets: a knob that nothing reads is
    worth a word only there."""
    if not composed(cfg):
        return []
    return [_override_key(o) for o in _ROOTS[id(cfg)][2]]


def group_lists(cfg: DictConfig | None) -> list[tuple[str, list[str]]]:
    """The overrides ``cfg`` was composed with that give a config group a list of options (``+exp=[sea,contrastive]``),
    as ``(group key, options)``: Hydra merges them into one config, later over earlier."""
    if not composed(cfg):
        return []
    found = []
    for override in _ROOTS[id(cfg)][2]:
        key, _, value = override.partition("=")
        if value.startswith("[") and value.endswith("]") and is_group(key, cfg):
            found.append((key, [v.strip() for v in value[1:-1].split(",") if v.strip()]))
    return found


def is_group(key: str, cfg: DictConfig | None = None) -> bool:
    """Whether an override's ``key`` (``+exp``, ``model/connector``, ``stage@stages.dpo``) picks a config group: a
    folder of options in a config folder ``cfg`` was composed from (:func:`config_roots`)."""
    group = _override_key(key)
    return any((root / group).is_dir() for root in config_roots(cfg))


def deleted_keys(cfg: DictConfig | None) -> list[str]:
    """The keys the overrides ``cfg`` was composed with delete (``stages.pretrain.epochs`` of
    ``~stages.pretrain.epochs``), in their order; none for a config ``compose`` did not return."""
    if not composed(cfg):
        return []
    return [_override_key(o) for o in _ROOTS[id(cfg)][2] if o.startswith("~")]


def composed_without(cfg: DictConfig, key: str) -> DictConfig:
    """The config ``cfg``'s overrides compose without those of ``key``: what the recipe and defaults set there."""
    return compose([o for o in _ROOTS[id(cfg)][2] if _override_key(o) != key]) if composed(cfg) else cfg


def _override_key(override: str) -> str:
    """The key an override sets: ``stages.a.lr`` of ``++stages.a.lr=1``, ``model`` of ``model@x=tiny``."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def default_keys(cfg: DictConfig | None = None) -> dict[str, set[str]]:
    """The keys each mapping of the defaults sets, by its place in the tree: ``""`` (the top level: ``train.yaml``,
    and the sections a recipe of ``exp/*.yaml`` adds, a method's own settings), ``stage``, ``stage.data``,
    ``stage.lora`` (from every ``stage/*.yaml``), ``distributed`` (``train.yaml`` and every ``launcher/*.yaml``),
    ``model`` (every ``model/*.yaml``), ``monitor``, ``logging.wandb``, ... (``train.yaml``), read in every folder
    ``cfg`` was composed from (:func:`config_roots`): a plug-in's recipe on ``hydra.searchpath`` adds its own section
    as one in ``configs/exp/`` does. A key no default sets is a typo: Hydra's advice for one,
    ``+stages.x.max_stepz=3`` or ``+stop_after_step=2``, would add it unread."""
    keys: dict[str, set[str]] = {}
    for where, node in _defaults(cfg):
        add_keys(keys, where, node)
    # a recipe's top-level keys only: what it sets below them are train.yaml's settings, whose typos stay typos
    for path in (path for root in config_roots(cfg) for path in sorted((root / "exp").glob("*.yaml"))):
        keys[""] |= {str(key) for key in OmegaConf.load(path) if key != "defaults"}
    return keys


def optional_keys(cfg: DictConfig | None = None) -> dict[str, set[str]]:
    """The keys some mapping of the defaults (:func:`default_keys`'s files) sets to null or to a mapping, by place:
    settings read as absent where they are (``init_from``, ``lora``, ``monitor``), which an override may delete."""
    keys: dict[str, set[str]] = {}
    for where, node in _defaults(cfg):
        add_keys(keys, where, node, lambda value: value is None or isinstance(value, dict))
    return keys


def _defaults(cfg: DictConfig | None) -> list[tuple[str, dict[str, Any]]]:
    """Each file of the defaults (``train.yaml``, every ``launcher/``, ``stage/`` and ``model/`` option in every folder
    ``cfg`` was composed from) as a container, with its place in the tree."""
    files = [("", config_dir() / "train.yaml")]
    for root in config_roots(cfg):
        files += [("distributed", path) for path in sorted((root / "launcher").glob("*.yaml"))]
        files += [("stage", path) for path in sorted((root / "stage").glob("*.yaml"))]
        files += [("model", path) for path in sorted((root / "model").glob("*.yaml"))]
    return [(where, OmegaConf.to_container(OmegaConf.load(path), resolve=False)) for where, path in files]


def add_keys(
    keys: dict[str, set[str]], where: str, node: dict[str, Any], holds: Callable[[Any], bool] = lambda value: True
) -> None:
    """``node``'s keys under ``where``, and those of each mapping below it under its dotted place; ``holds``: which
    values' keys to add (every one's by default)."""
    for key, value in node.items():
        if key in ("defaults", "hydra"):  # Hydra's own: what to compose, where it writes; no setting of a run
            continue
        if holds(value):
            keys.setdefault(where, set()).add(str(key))
        if isinstance(value, dict):
            add_keys(keys, f"{where}.{key}" if where else str(key), value, holds)


def plain(node: Any) -> Any:
    """A config node as plain Python containers, interpolations resolved (other values are returned as they are)."""
    return (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node
    )


def instantiate(node: Mapping[str, Any], key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with the config key in the error message."""
    if node is None or "_target_" not in node:
        raise ValueError(f"config {key} needs a _target_ (the class or function to build), got {node!r}")
    if not isinstance(node, DictConfig):
        node = OmegaConf.create(dict(node))
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, OSError)):  # the part's own message already names the bad value
            raise e.__cause__ from None
        raise ValueError(f"config {key} (_target_={node.get('_target_')}) could not be built: {e}") from e
