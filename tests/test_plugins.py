"""A plug-in author's path: the README's own example part, configs kept outside the repository on Hydra's search
path, and the errors a plug-in's mistakes meet, each naming the config key."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from alignlm.checks import check_config
from alignlm.config import ConfigError, config_dir, config_roots
from alignlm.data.build import build_dataset
from alignlm.models.build import build_model
from alignlm.models.connectors import Connector, ConnectorOutput
from alignlm.objectives.base import LossTerm, Objective, check_term
from alignlm.pipeline import run
from tests.conftest import compose, make_batch, tiny_overrides

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(section: str) -> dict[str, str]:
    """The fenced code blocks of a README section by language, as written there."""
    text = README.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S))


@pytest.fixture
def readme_part(tmp_path, monkeypatch) -> Path:
    """The README's Extending example as a user writes it: the package its first line names, importable, and the
    YAML file in a config folder of their own; returns that folder."""
    blocks = readme_blocks("Extending")
    module = re.match(r"# (\S+\.py)\n", blocks["python"]).group(1)  # my_pkg/connectors.py
    yaml_path = re.match(r"# configs/(\S+\.yaml)", blocks["yaml"]).group(1)  # model/connector/pool2x.yaml
    (tmp_path / "src" / module).parent.mkdir(parents=True)
    (tmp_path / "src" / module).parent.joinpath("__init__.py").write_text("")
    (tmp_path / "src" / module).write_text(blocks["python"])
    (tmp_path / "conf" / yaml_path).parent.mkdir(parents=True)
    (tmp_path / "conf" / yaml_path).write_text(blocks["yaml"])
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    package = module.split("/")[0]
    for name in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
        monkeypatch.delitem(sys.modules, name)
    yield tmp_path / "conf"
    for name in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
        del sys.modules[name]


@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_the_readmes_example_connector_trains_a_step_on_the_demos_tower(readme_part, colour_set, tmp_path, select):
    """The README's Pool2x crashed on the demo model: its EfficientNet-Lite tower gives 1 + 16 = 17 tokens
    (select_feature=cls_patch), which unflatten(1, (-1, 2)) cannot pair, and num_tokens (n // 2) disagreed with what
    forward returned. The example is read from README.md itself, so it cannot go stale."""
    overrides = tiny_overrides(
        colour_set,
        tmp_path / "out",
        f"hydra.searchpath=[file://{readme_part}]",
        "model/connector=pool2x",
        "model/vision=efficientnet_lite0",
        "model.vision.weights=null",
        f"model.vision.select_feature={select}",
        "run=[pretrain]",
        "stages.pretrain.max_steps=1",
        "stages.pretrain.save_every=0",
    )
    cfg = compose(*overrides)
    assert build_model(cfg.model).vision.num_patches == {"patch": 16, "cls_patch": 17}[select]
    run(cfg)
    assert (tmp_path / "out" / "t" / "pretrain" / "final" / "model.safetensors").exists()


def test_a_recipe_outside_the_repository_adds_its_own_section_as_one_inside_does(tmp_path):
    """A recipe on hydra.searchpath composed, but its own top-level section was refused as an unknown setting: the
    known keys were read from configs/exp alone. A typo of a setting is still refused, now with the recipe's
    section among the known ones."""
    (tmp_path / "conf" / "exp").mkdir(parents=True)
    (tmp_path / "conf" / "exp" / "my_recipe.yaml").write_text(
        "# @package _global_\nmymethod:\n  steps: 3\nstages:\n  pretrain:\n    max_steps: ${mymethod.steps}\n"
    )
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    cfg = compose(search, "+exp=my_recipe", f"output_dir={tmp_path}")
    assert config_roots(cfg) == [config_dir(), tmp_path / "conf"]
    check_config(cfg)
    assert cfg.stages.pretrain.max_steps == 3
    with pytest.raises(ConfigError, match="mymethd is not a known setting; did you mean 'mymethod'?"):
        check_config(compose(search, "+exp=my_recipe", "+mymethd.steps=4", f"output_dir={tmp_path}"))
    with pytest.raises(ConfigError, match="mymethod is not a known setting"):  # no recipe of its own: a stray key
        check_config(compose("+mymethod.steps=4", f"output_dir={tmp_path}"))
    # a sweep script's copy has lost where its recipe came from: the refusal says so, rather than calling it a typo
    with pytest.raises(ConfigError, match="mymethod is not a known setting.*a copy or merge of the one"):
        check_config(copy.deepcopy(cfg))


def test_a_hook_that_builds_no_sample_hook_is_named_with_its_stage(tiny_model, colour_set):
    """The error named data.hooks.q: which stage's hooks, the trainer did not say."""
    data = {"template": "plain", "sources": [{"path": str(colour_set["pretrain"])}], "hooks": {"q": {"_target_": "builtins.dict"}}}  # fmt: skip
    with pytest.raises(TypeError, match=r"^stages.finetune.data.hooks.q built a dict, not an alignlm SampleHook"):
        build_dataset(data, tiny_model(), 0, key="stages.finetune.data")


class FourTokens(Connector):
    """A connector that forgot num_tokens: it returns 4 tokens per image whatever the tower gives."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = torch.nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> ConnectorOutput:
        return ConnectorOutput(self.proj(torch.nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), 4).transpose(1, 2)))


def test_a_connector_returning_other_than_its_num_tokens_is_named(tiny_model):
    """The forward failed with "the batch has 64 image-token slots, not 4 images x 4 tokens", naming neither the
    connector nor num_tokens."""
    model = tiny_model(f"model.connector._target_={__name__}.FourTokens", "~model.connector.depth")
    with pytest.raises(ValueError, match=re.escape("model.connector (FourTokens) returned 4 tokens per image, but its num_tokens(16) says 16")):  # fmt: skip
        model(make_batch(model, [2, 2]))


class BareTensor(FourTokens):
    """A connector that returns its tokens alone, not a ConnectorOutput."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RowAux(BareTensor):
    """A connector whose auxiliary loss is one value per image, not reduced."""

    def forward(self, x: torch.Tensor) -> ConnectorOutput:
        tokens = self.proj(x)
        return ConnectorOutput(tokens, aux_losses={"spread": tokens.pow(2).mean((1, 2))})


@pytest.mark.parametrize(
    ("connector", "message"),
    [
        ("BareTensor", "model.connector (BareTensor) returned a Tensor, not a ConnectorOutput"),
        (
            "RowAux",
            "model.connector (RowAux) returned aux_losses['spread'] of a torch.float32 tensor of shape [2]: each is a 0-dim",
        ),
    ],
)
def test_a_connector_breaking_its_output_contract_is_named(tiny_model, connector, message):
    """A bare tensor failed in the model with "'Tensor' object has no attribute 'tokens'", an auxiliary loss per
    image in the backward with "grad can be implicitly created only for scalar outputs": neither named the connector."""
    model = tiny_model(f"model.connector._target_={__name__}.{connector}", "~model.connector.depth")
    with pytest.raises(TypeError, match=re.escape(message)):
        model(make_batch(model, [1, 1]))


class Returns(Objective):
    """An objective that returns what it is given."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def forward(self, batch, out, model):
        return self.value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            LossTerm(torch.zeros(3)),
            "returned a loss of a torch.float32 tensor of shape [3]: a LossTerm's loss is a 0-dim",
        ),
        (LossTerm(0.5), "returned a loss of a float: a LossTerm's loss is a 0-dim floating tensor"),
        ({"loss": torch.zeros(())}, "returned a dict, not a LossTerm(loss, metrics)"),
        (LossTerm(torch.zeros((), dtype=torch.long)), "returned a loss of a torch.int64 tensor of shape []"),
    ],
)
def test_an_objective_breaking_its_output_contract_is_named(value, message):
    """A loss per sample failed in the backward ("grad can be implicitly created only for scalar outputs"), a float or
    a dict in the logging ("'float' object has no attribute 'detach'"), naming no objective."""
    objective = Returns(value)
    with pytest.raises(TypeError, match=re.escape(f"stages.s.objectives.mine (Returns) {message}")):
        check_term("stages.s.objectives.mine", objective, objective(None, None, None))


class KeepsTheTower(Returns):
    """An objective that keeps the model's tower as a submodule."""

    def setup(self, model, dataset) -> None:
        self.tower = model.vision


def test_an_objective_holding_a_part_of_the_model_is_refused_naming_both(colour_set, tmp_path):
    """Its weights became the objective's state: a frozen tower was written whole into every step checkpoint, and a
    trained part failed with "some parameters appear in more than one parameter group", naming nothing."""
    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer

    cfg = compose(
        *tiny_overrides(colour_set, tmp_path),
        f"+stages.pretrain.objectives.keep._target_={__name__}.KeepsTheTower",
        "+stages.pretrain.objectives.keep.value=null",
    )
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    with pytest.raises(
        TypeError, match=r"stages.pretrain.objectives.keep \(KeepsTheTower\) holds the model's vision\."
    ):
        trainer.setup()


# A researcher's own alignment metrics, named by their dotted paths (tests.test_plugins.<name>)
def mean_cosine(A: torch.Tensor, B: torch.Tensor) -> float:
    """The mean cosine of each item's two features: one space."""
    return torch.nn.functional.cosine_similarity(A, B, dim=1).mean().item()


mean_cosine.same_space = True


def neighbour_counts(A: torch.Tensor, B: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """Two numbers, one a 0-dim tensor, and the suite's topk; the features come in float64."""
    assert A.dtype == B.dtype == torch.float64
    return {"topk": torch.tensor(float(topk)), "items": float(A.shape[0])}


def a_word(A: torch.Tensor, B: torch.Tensor) -> str:
    return "high"


def test_a_metric_of_ones_own_is_measured_by_its_dotted_path_beside_the_suites():
    from alignlm.geometry.suite import pair_metrics

    g = torch.Generator().manual_seed(0)
    A, B = (torch.randn(12, 6, generator=g, dtype=torch.float64) for _ in range(2))
    names = ["modality_gap", f"{__name__}.mean_cosine", f"{__name__}.neighbour_counts"]
    got = pair_metrics(A, B, names, topk=3)
    assert set(got) == {
        "modality_gap",
        f"{__name__}.mean_cosine",
        f"{__name__}.neighbour_counts/topk",
        f"{__name__}.neighbour_counts/items",
    }
    assert got[f"{__name__}.mean_cosine"] == pytest.approx(mean_cosine(A, B))
    assert got[f"{__name__}.neighbour_counts/topk"] == 3.0 and got[f"{__name__}.neighbour_counts/items"] == 12.0
    # a metric of one space is skipped for features of two (the vision tower's against the captions'), as the gap is
    other = pair_metrics(A.float(), torch.randn(12, 4, generator=g), names, topk=3)
    assert set(other) == {f"{__name__}.neighbour_counts/topk", f"{__name__}.neighbour_counts/items"}
    # a builtin without a signature gets the two sets alone
    assert pair_metrics(A, B, ["torch.dist"]) == {"torch.dist": pytest.approx(torch.dist(A, B).item())}
    with pytest.raises(TypeError, match=rf"metric {__name__}.a_word returned str for its value: a metric returns a"):
        pair_metrics(A, B, [f"{__name__}.a_word"])


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("tests.test_plugins.no_such_metric", "tests.test_plugins has no function no_such_metric"),
        ("no_such_package.metric", "its module does not import: No module named 'no_such_package'"),
        ("cosine", "no metric of that name, nor a dotted path pkg.module.fn"),
    ],
)
def test_an_unknown_metric_is_refused_at_start_up_saying_why(tmp_path, name, why):
    overrides = ["monitor.every=2", "monitor.probe=x.json", f"monitor.metrics=[{name}]", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=re.escape(f"monitor.metrics has unknown metrics: {name} ({why}). Choose")):
        check_config(compose(*overrides))


def test_the_monitor_and_alignlm_eval_report_a_metric_of_ones_own(colour_set, tmp_path):
    """The in-training monitor and alignlm eval's probe measure through one suite: a plug-in metric reaches
    metrics.jsonl and the evaluation's report under its name, beside the suite's."""
    from alignlm.commands import main

    metric = f"{__name__}.mean_cosine"
    probe = [f"monitor.probe={colour_set['pretrain']}", "monitor.every=2", "monitor.n=8", "monitor.topk=3"]
    run(compose(*tiny_overrides(colour_set, tmp_path, "run=[pretrain]", *probe, f"monitor.metrics=[cka,{metric}]")))
    rows = [json.loads(line) for line in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if f"monitor/pooled/{metric}" in r]
    assert measured and all(-1 <= r[f"monitor/pooled/{metric}"] <= 1 and "monitor/pooled/cka" in r for r in measured)
    flags = ["--probe", str(colour_set["pretrain"]), "--probe-n", "8", "--no-plots", "--out", str(tmp_path / "r")]
    knobs = [f"--set=probe.metrics=[cka,{metric}]", "--set=probe.topk=3", "--set=probe.artifacts.enabled=false"]
    assert main(["eval", str(tmp_path / "t" / "pretrain" / "final"), *flags, *knobs]) == 0
    (checkpoint,) = json.loads((tmp_path / "r" / "report.json").read_text())["checkpoints"]
    assert -1 <= checkpoint["probe"]["pooled"][metric] <= 1
    table = (tmp_path / "r" / "report.md").read_text().split("\n\n")[1]  # the comparison table, the headline
    assert table.startswith("| checkpoint |") and f"| {metric} |" in table.splitlines()[0]
