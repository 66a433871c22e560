"""The package's layering (docs/architecture.md): imports point down only, no module imports itself around a circle,
generic layers never name a method, and command-line parsing lives in alignlm.commands alone.

Imports are read with ``ast`` from every module of ``src/alignlm``, wherever they sit in the file.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "alignlm"

# Bottom to top: a module may import its own layer and the layers listed before it, never one after it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("alignlm", "alignlm.constants", "alignlm.config", "alignlm.files")),
    ("geometry", ("alignlm.geometry",)),
    ("data", ("alignlm.data",)),
    ("models", ("alignlm.models",)),
    ("objectives", ("alignlm.objectives",)),
    ("methods", ("alignlm.methods",)),
    ("export", ("alignlm.export",)),
    ("training", ("alignlm.training",)),
    ("evaluation", ("alignlm.evaluation",)),
    ("pipeline", ("alignlm.pipeline", "alignlm.checks")),
    ("commands", ("alignlm.commands",)),
]
GENERIC = ("base", "geometry", "data", "models", "objectives", "export", "training", "evaluation", "pipeline")
METHOD_NAMES = re.compile(r"\b(SEA|AlignGPT|ReVision|ReAlign)\b|align_levels|sea_labels|aligngpt|revision")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = max(
        (
            (len(prefix), i)
            for i, (_, prefixes) in enumerate(LAYERS)
            for prefix in prefixes
            if module == prefix or (prefix != "alignlm" and module.startswith(prefix + "."))
        ),
        default=None,
    )
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS; add it to docs/architecture.md and here")
    return best[1]


def imports(module: str) -> set[str]:
    """The alignlm modules ``module`` imports (a ``from pkg import name`` that names a submodule counts as it)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "alignlm")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.split(".")[0] != "alignlm":
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_point_down_only():
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in GRAPH.items()
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t) :] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_generic_layers_never_import_a_method_or_a_command():
    found = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if LAYERS[layer_of(m)][0] in GENERIC
        for t in sorted(targets)
        if t.startswith(("alignlm.methods", "alignlm.commands"))
    ]
    assert not found, "generic modules importing a method or a command:\n" + "\n".join(found)


def test_generic_layers_never_name_a_method():
    named = [
        f"{m}: {sorted(set(match.group(0) for match in METHOD_NAMES.finditer(MODULES[m].read_text())))}"
        for m in MODULES
        if LAYERS[layer_of(m)][0] in GENERIC and METHOD_NAMES.search(MODULES[m].read_text())
    ]
    assert not named, "generic modules naming a method (move the code to alignlm.methods.<method>):\n" + "\n".join(
        named
    )


def test_command_line_parsing_lives_in_the_commands_package_only():
    parsing = [
        m
        for m in MODULES
        if not m.startswith("alignlm.commands")
        and any(
            isinstance(n, (ast.Import, ast.ImportFrom)) and "argparse" in ast.unparse(n)
            for n in ast.walk(ast.parse(MODULES[m].read_text()))
        )
    ]
    assert not parsing, f"library modules that parse arguments: {parsing}"


def test_the_layer_check_catches_an_upward_import():
    assert layer_of("alignlm.models.mllm") > layer_of("alignlm.data.llava")
    assert layer_of("alignlm.commands.train") > layer_of("alignlm.pipeline") > layer_of("alignlm.training.trainer")
    assert (
        "alignlm.data.records" in GRAPH["alignlm.data.llava"]
        and "alignlm.models.extras" in GRAPH["alignlm.models.mllm"]
    )


def test_a_run_without_lora_imports_neither_peft_nor_matplotlib():
    """peft is imported only by a LoRA stage (and its config check), matplotlib only by what draws: importing them took
    seconds of every CLI call's and every rank's start. peft's shorthand for every linear layer is named once, and
    equals peft's."""
    import subprocess
    import sys

    from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND

    from alignlm.training.stages import ALL_LINEAR

    assert ALL_LINEAR == INCLUDE_LINEAR_LAYERS_SHORTHAND
    code = (  # the command line imports every command's module: evaluation's and its plots' too
        "import sys, alignlm.pipeline, alignlm.commands; alignlm.commands.build_parser(); "
        "print(sorted({'peft', 'matplotlib'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
