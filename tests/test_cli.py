"""The command line's answer to a user's mistake (docs/reliability.md): one line and an exit status from ``console``,
counts and other flag values refused when parsed, a config that cannot start refused before anything is built, and
``--help`` that shows every flag's default. Every test here runs in-process and loads no model."""

from __future__ import annotations

import argparse
import json
import re
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import alignlm.commands as commands
from alignlm.checks import check_config
from alignlm.commands import HelpFormatter, build_parser, console, main
from alignlm.config import ConfigError
from alignlm.data.records import DataError, read_records
from alignlm.models.probes import resolve_layers
from tests.conftest import compose

ROOT = Path(__file__).resolve().parents[1]

# ---- console: a mistake is one line and a status, a bug keeps its traceback ---------------------------------------


@pytest.mark.parametrize(
    "error,status,line",
    [
        (DataError("data file x.json does not exist"), 65, "alignlm eval: data file x.json does not exist"),
        (ConfigError("stages.x.lr=-1 must be ..."), 2, "alignlm eval: stages.x.lr=-1 must be ..."),
        (SystemExit("--sets takes NAME=PATH, got 'foo'"), 2, "alignlm eval: --sets takes NAME=PATH, got 'foo'"),
        (SystemExit("alignlm wca: no records"), 2, "alignlm wca: no records"),  # names its command already
        (
            FileNotFoundError(2, "No such file or directory", "/x/report.json"),
            1,
            "alignlm eval: /x/report.json: No such",
        ),
        (IsADirectoryError(21, "Is a directory", "/x"), 1, "alignlm eval: /x: Is a directory"),
        (ValueError("invalid literal for int()"), 1, "alignlm eval: ValueError: invalid literal for int()"),
        (KeyError("checkpoints"), 1, "alignlm eval: KeyError: 'checkpoints'"),
        (KeyboardInterrupt(), 130, "alignlm eval: interrupted"),
    ],
)
def test_console_prints_a_mistake_as_one_line_and_an_exit_status(monkeypatch, capsys, error, status, line):
    def fail(argv):
        raise error

    monkeypatch.setattr(commands, "main", fail)
    assert console(["eval", "ckpt"]) == status
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err


def test_a_foreign_value_or_key_error_says_how_to_see_where_it_was_raised(monkeypatch, capsys):
    """A plug-in's own KeyError inside its hook printed one line with no location, and nothing named ALIGNLM_DEBUG."""

    def fail(argv):
        raise KeyError("missing")

    monkeypatch.setattr(commands, "main", fail)
    assert console(["train"]) == 1
    assert capsys.readouterr().err == "alignlm train: KeyError: 'missing' (ALIGNLM_DEBUG=1 shows where it was raised)\n"


def test_console_keeps_argparse_statuses_and_the_traceback_of_a_bug_or_under_alignlm_debug(monkeypatch, capsys):
    assert console(["--help"]) == 0
    assert console(["bogus"]) == 2  # argparse printed the usage
    capsys.readouterr()

    def bug(argv):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(commands, "main", bug)
    with pytest.raises(ZeroDivisionError):
        console(["dual-encoder", "fit"])

    def mistake(argv):
        raise DataError("no records")

    monkeypatch.setattr(commands, "main", mistake)
    monkeypatch.setenv("ALIGNLM_DEBUG", "1")
    with pytest.raises(DataError):
        console(["train"])


def test_every_entry_point_runs_console(monkeypatch):
    """The console script, ``python -m alignlm.commands`` (spawned ranks) and the ``train.py`` shim."""
    assert '\nalignlm = "alignlm.commands:console"\n' in (ROOT / "pyproject.toml").read_text()
    calls = []
    monkeypatch.setattr(commands, "console", lambda argv=None: calls.append(argv) or 7)
    monkeypatch.setattr(sys, "argv", ["x", "stages.pretrain.max_steps=2"])
    for start in (
        lambda: runpy.run_module("alignlm.commands", run_name="__main__"),
        lambda: runpy.run_path(str(ROOT / "train.py"), run_name="__main__"),
    ):
        with pytest.raises(SystemExit) as done:
            start()
        assert done.value.code == 7
    assert calls == [None, ["train", "stages.pretrain.max_steps=2"]]


def test_a_data_source_that_is_missing_or_a_folder_is_a_data_error_exit_65(tmp_path, capsys):
    with pytest.raises(DataError, match="nowhere.json does not exist"):
        read_records(tmp_path / "nowhere.json")
    with pytest.raises(DataError, match="is a folder"):
        read_records(tmp_path)
    assert console(["lmms-task", str(tmp_path), str(tmp_path / "tasks")]) == 65
    assert f"alignlm lmms-task: data file {tmp_path} is a folder" in capsys.readouterr().err


# ---- flag values refused when parsed, before anything loads -------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["v2l-words", "ckpt", "--data", "d.json", "--limit", "0"], "--limit: '0' is not a whole number >= 1"),
        (["v2l-words", "ckpt", "--data", "d.json", "--limit", "-1"], "--limit: '-1' is not a whole number >= 1"),
        (["sea-eval", "ckpt", "--labels", "l", "--data", "d.json", "--limit", "-1"], "--limit: '-1'"),
        (["sea-eval", "ckpt", "--labels", "l", "--data", "d.json", "--batch-size", "0"], "--batch-size: '0'"),
        (["wca", "--encoder", "e", "--set", "d.json", "--descriptions", "a {c}", "--limit", "0"], "--limit: '0'"),
        (["sima", "generate", "ckpt", "--set", "c=d.json", "--out", "o", "--limit", "0"], "--limit: '0'"),
        (["sima", "generate", "ckpt", "--set", "c=d.json", "--out", "o", "--samples", "0"], "--samples: '0'"),
        (["sima", "generate", "ckpt", "--set", "c=d.json", "--out", "o", "--samples", "-1"], "--samples: '-1'"),
        (
            ["sima", "generate", "ckpt", "--set", "c=d.json", "--out", "o", "--temperature", "0"],
            "--temperature: '0' is not a finite number > 0",
        ),
        (["dual-encoder", "fit", "--train", "d.json", "--out", "o", "--dim", "0"], "--dim: '0'"),
        (["dual-encoder", "fit", "--train", "d.json", "--out", "o", "--batch-size", "0"], "--batch-size: '0'"),
        (["dual-encoder", "fit", "--train", "d.json", "--out", "o", "--epochs", "-1"], "--epochs: '-1'"),
        (["dual-encoder", "fit", "--train", "d.json", "--out", "o", "--limit", "0"], "--limit: '0'"),
        # checked after the long pass before (the frozen features, every pair scored, every shard streamed)
        (
            ["dual-encoder", "fit", "--train", "d.json", "--out", "o", "--temperature", "0"],
            "--temperature: '0' is not a finite number in (0, 1]",
        ),
        (
            ["aligngpt-levels", "--data", "d.json", "--encoder", "e", "--levels", "1"],
            "--levels: '1' is not a whole number >= 2",
        ),
        (
            ["realign", "fit", "--images", "i", "--texts", "t", "--out", "o", "--covariance", "-1"],
            "--covariance: '-1' is not a finite number >= 0",
        ),
        (["data", "digits", "--seed", "-1"], "--seed: '-1' is not a whole number >= 0"),
        (["realign", "fit", "--images", "i", "--texts", "t", "--out", "o", "--chunk-rows", "0"], "--chunk-rows: '0'"),
        (["realign", "fit", "--images", "i", "--texts", "t", "--out", "o", "--threads", "0"], "--threads: '0'"),
        (["realign", "apply", "--stats", "s", "--texts", "t", "--out", "o", "--chunk-rows", "0"], "--chunk-rows"),
        (["embed", "--encoder", "e", "--texts", "d.json", "--out", "o", "--shard-size", "0"], "--shard-size: '0'"),
        (["eval", "ckpt", "--layers", "a,b"], "--layers: 'a,b' is neither 'all' nor comma-separated layer indices"),
    ],
)
def test_counts_and_layer_lists_are_refused_when_parsed(tmp_path, monkeypatch, capsys, argv, message):
    """Each once ran on: to a traceback, a made-up result with exit status 0, or a leftover file."""
    monkeypatch.chdir(tmp_path)  # every path named is missing: the flag fails first
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # sima generate --limit 0 left c.prompts.json behind


def test_a_knob_without_a_value_and_a_folder_without_critics_are_refused(tmp_path, capsys):
    assert main(["data", "digits", "--out", str(tmp_path), "--set", "n_test"]) == 2  # once n_test='' reached the maker
    assert "alignlm data digits: --set takes KNOB=VALUE, got 'n_test'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"no <name>\.critic\.json in .*; name a folder `alignlm sima generate`"):
        main(["sima", "check", str(tmp_path)])  # printed {} and exited 0
    assert not (tmp_path / "critic_check.json").exists()


def test_layers_outside_the_llms_hidden_states_are_refused():
    """``--layers 99`` on a 2-layer LLM was probed as layer 0 (the index wrapped around)."""
    model = SimpleNamespace(llm=SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2)))
    assert resolve_layers(model, [0, -1, -3, 2]) == [0, 2]
    assert resolve_layers(model, "all") == [0, 1, 2]
    for bad in ([99], [3], [-4], [1.5], "0"):
        with pytest.raises(ConfigError, match=r"this LLM has 2 layers; give 'all' or whole numbers in -3\.\.2"):
            resolve_layers(model, bad)


# ---- init_from and model=llava_hf: refused before anything is built --------------------------------------------


def _folder(path: Path, *files: str, llava: bool = False) -> Path:
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("{}")
    if llava:
        (path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    return path


def _init_from(tmp_path: Path, init: Path, *extra: str) -> None:
    check_config(compose(f"output_dir={tmp_path}", "run=[finetune]", f"stages.finetune.init_from={init}", *extra))


@pytest.mark.parametrize(
    "make,found",
    [
        (lambda d: _folder(d, "trainable.safetensors", "trainer_state.json"), "is a step checkpoint"),
        (lambda d: _folder(d, "x.json") / "x.json", "is a file, not a folder"),
        (
            lambda d: _folder(d / "finetune" / "final", "model.safetensors", "config.yaml").parents[1],
            "is a stage or run folder",
        ),
        (
            lambda d: _folder(d, "config.json", "model.safetensors"),
            "is a transformers folder whose config.json is not a Llava",
        ),
        (lambda d: _folder(d), "holds neither model.safetensors + config.yaml nor a config.json"),
    ],
)
def test_init_from_must_be_a_final_or_a_llava_folder(tmp_path, make, found):
    """A step checkpoint or a file passed the check and failed when the stage started, after earlier stages trained."""
    init = make(tmp_path / "init")
    with pytest.raises(ConfigError, match=re.escape(f"stages.finetune.init_from='{init}' {found}")):
        _init_from(tmp_path, init)


def test_a_final_or_a_llava_folder_starts_a_stage(tmp_path):
    _init_from(tmp_path, _folder(tmp_path / "final", "model.safetensors", "config.yaml"))
    _init_from(tmp_path, _folder(tmp_path / "llava", llava=True))


def test_a_llava_model_must_start_from_its_weights(tmp_path):
    """``model=llava_hf`` with no ``init_from`` trained its random weights and said nothing."""
    llava = _folder(tmp_path / "llava", llava=True)
    with pytest.raises(ConfigError, match=rf"add stages\.finetune\.init_from={llava} to start from the folder"):
        _init_from(tmp_path, "null", "model=llava_hf", f"model.path={llava}")
    with pytest.raises(ConfigError, match="model=llava_hf needs model.path=DIR"):
        _init_from(tmp_path, llava, "model=llava_hf")
    _init_from(tmp_path, llava, "model=llava_hf", f"model.path={llava}")  # README's command


# ---- --help ------------------------------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, name: str = "alignlm"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_help_shows_every_flags_default_and_train_its_exit_statuses():
    parsers = dict(_parsers(build_parser()))
    for name, parser in parsers.items():
        assert parser.formatter_class is HelpFormatter, name
        undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
        assert not undocumented, (name, undocumented)
    assert "(default: 16)" in parsers["alignlm wca"].format_help()
    assert "(default: 40)" in parsers["alignlm dual-encoder fit"].format_help()
    assert "(default: None)" not in parsers["alignlm eval"].format_help()  # the help says what leaving it out means
    train = " ".join(parsers["alignlm train"].format_help().split())
    assert all(s in train for s in ("75 stopped", "65 data", "2 a config"))


# ---- alignlm eval, compare and export: a mistake named before anything is loaded ------------------------------------


def _eval(tmp_path: Path, *flags: str) -> int:
    """``alignlm eval`` of a checkpoint that is not there: a knob's check has to fail before it is looked for."""
    return main(["eval", str(tmp_path / "no_checkpoint_here"), "--out", str(tmp_path / "r"), *flags])


@pytest.mark.parametrize(
    "knob,message",
    [
        ("batch_sise=4", "eval.batch_sise is not a known setting; did you mean 'batch_size'"),
        ("probe.top_k=3", "eval.probe.top_k is not a known setting; did you mean 'topk'"),
        ("gap_shift.metirc=cka", "eval.gap_shift.metirc is not a known setting; did you mean 'metric'"),
        ("probe.artifacts.enable=false", "eval.probe.artifacts.enable is not a known setting; did you mean 'enabled'"),
    ],
)
def test_eval_names_a_mistyped_knob_at_any_level(tmp_path, knob, message):
    """A nested knob was merged in unread (``probe.top_k=3`` measured with topk 10): only top keys were checked."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        _eval(tmp_path, "--set", knob)


def test_eval_checks_metric_names_sets_the_device_and_out_before_loading(tmp_path, monkeypatch):
    """Each of these failed only after every checkpoint was generated (or said nothing: a set of the same name)."""
    with pytest.raises(FileNotFoundError, match="no_checkpoint_here does not exist"):  # transformers' own knobs pass
        _eval(tmp_path, "--set", "generation.temperature=0.7", "--set", "generation.top_k=5")
    with pytest.raises(SystemExit, match=r"gap_shift.metric='nope' is not known; choose from \['modality_gap'"):
        _eval(tmp_path, "--set", "gap_shift.metric=nope")
    with pytest.raises(SystemExit, match=r"probe.layer_metrics has unknown metrics: nope \(no metric of that name"):
        _eval(tmp_path, "--set", "probe.layer_metrics=[nope]")
    questions = tmp_path / "q.json"
    questions.write_text("[]")
    with pytest.raises(ConfigError, match=r"eval.sets name \['s'\] more than once; give each set a name of its own"):
        _eval(tmp_path, "--sets", f"s={questions}", f"s={questions}")
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="--out .*afile is a file; give a folder"):
        _eval(tmp_path, "--out", str(tmp_path / "afile"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="device='cuda': this machine has no CUDA device"):
        _eval(tmp_path, "--device", "cuda")


def _report(path: Path, *checkpoints: dict) -> str:
    path.write_text(json.dumps({"checkpoints": list(checkpoints)}))
    return str(path)


def _checkpoint(label: str, scores: dict, **more) -> dict:
    run = label.split("/")[-3]
    sets = {"s1": {"kind": "qa", "n": len(scores), "accuracy": 0.5, "scores": scores}}
    return {"label": label, "run": run, "stage": "finetune", "step": 8, "kind": "final", "sets": sets, **more}


def test_compare_refuses_what_is_no_pair_and_writes_strict_json(tmp_path, capsys):
    """One checkpoint blamed old reports, a JSON that is no report was KeyError 'checkpoints', and ``--json`` printed
    ``Infinity`` when every shared question moved one way."""
    a = _report(tmp_path / "a.json", _checkpoint("a/finetune/final", {"q0": 0, "q1": 0, "q2": 0}))
    b = _report(tmp_path / "b.json", _checkpoint("b/finetune/final", {"q0": 1, "q1": 1, "q2": 1}))
    with pytest.raises(SystemExit, match=r"hold 1 checkpoint; compare needs two or more"):
        main(["compare", a])
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(SystemExit, match="other.json is not a report.json of alignlm eval"):
        main(["compare", str(tmp_path / "other.json"), a])
    assert main(["compare", a, b, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)
    assert row["diff"] == 1.0 and row["z"] is None


def test_compare_names_a_set_whose_questions_do_not_pair(tmp_path, capsys):
    """A set keyed by another path in each report (records without an id, before they were keyed by index) shared no
    question: its row was silently missing, or compare blamed reports without scores."""
    old = {"s1": {"kind": "qa", "scores": {"set.json#0": 1, "set.json#1": 0}}}
    new = {"s1": {"kind": "qa", "scores": {"#0": 1, "#1": 1}}}
    a = _report(tmp_path / "a.json", _checkpoint("a/finetune/final", {}) | {"sets": old})
    b = _report(tmp_path / "b.json", _checkpoint("b/finetune/final", {}) | {"sets": new})
    with pytest.raises(SystemExit, match=r"nothing to compare: the question sets \['s1 \(a/finetune/final vs b/"):
        main(["compare", a, b])
    paired = {"kind": "qa", "scores": {"q0": 0, "q1": 1}}
    a = _report(tmp_path / "a.json", _checkpoint("a/finetune/final", {}) | {"sets": {**old, "s2": paired}})
    b = _report(tmp_path / "b.json", _checkpoint("b/finetune/final", {}) | {"sets": {**new, "s2": paired}})
    assert main(["compare", a, b]) == 0
    out, err = capsys.readouterr()
    assert "| b/finetune/final | a/finetune/final | s2 | 2 |" in out
    assert "left out: the question sets ['s1 (a/finetune/final vs b/finetune/final)'] share fewer than 2" in err


def test_compare_tells_apart_runs_of_one_name_from_separate_reports(tmp_path, capsys):
    """Two seeds ``s1/raw`` and ``s2/raw``, each evaluated alone: both reports say ``raw/finetune/final``, which compare
    refused as one checkpoint twice; ``--same-step`` merged the runs."""
    reports = [
        _report(
            tmp_path / f"{seed}.json",
            _checkpoint("raw/finetune/final", {"q0": v, "q1": v}, path=f"/runs/{seed}/raw/finetune/final", above=""),
        )
        for seed, v in (("s1", 0), ("s2", 1))
    ]
    assert main(["compare", *reports, "--same-step", "--reference", "s1/raw", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [(r["a"], r["b"], r["diff"]) for r in json.loads(out)] == [
        ("s1/raw/finetune/final", "s2/raw/finetune/final", 1.0)
    ]
    assert "named by their folders: ['raw/finetune/final -> s1/raw/finetune/final'" in err
    with pytest.raises(SystemExit, match="repeat a checkpoint label"):
        main(["compare", reports[0], reports[0]])  # the same checkpoint twice


def test_export_says_it_takes_a_final_folder_and_where_one_is(tmp_path, capsys):
    """A run folder or a step checkpoint was refused with "<it>/config.yaml: No such file or directory"."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    final = _folder(run / "finetune" / "final", "config.yaml")
    save_file({}, str(final / "model.safetensors"))
    step = _folder(run / "finetune" / "checkpoints" / "step_000002", "trainable.safetensors")
    (step / "trainer_state.json").write_text(json.dumps({"step": 2, "stage": "finetune"}))
    for given, says in (
        (run, f"is not a final/ folder (config.yaml + model.safetensors), which export takes; the final/ folders in "
         f"it: ['{final}']"),
        (step, f"is a step checkpoint (its stage's trained weights only); export takes a final/ folder: its stage's "
         f"is {final}"),
        (tmp_path / "nothing", "is not a final/ folder"),
    ):  # fmt: skip
        assert main(["export", str(given), str(tmp_path / "hf")]) == 2
        assert f"alignlm export: {given} {says}" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


# ---- alignlm train: Hydra's refusals and a config without data, one line and exit status 2 -------------------------


@pytest.mark.parametrize(
    "overrides, line",
    [
        # Hydra's two lines advised +stages.pretrain.max_step=50, which the start-up checks then refused
        (
            ["+exp=demo", "stages.pretrain.max_step=50"],
            "alignlm: stages.pretrain.max_step is not a known setting; did you mean 'max_steps'? known: [",
        ),
        (["stop_after_step=2"], "alignlm: stop_after_step is not a known setting; did you mean 'stop_after_steps'?"),
        (["monitor.evry=5"], "alignlm: monitor.evry is not a known setting; did you mean 'every'?"),
        (["stages.pretrain.lr.conector=1e-3"], "alignlm: stages.pretrain.lr.conector is not a known setting; did you"),
        (["stages.pretrian.max_steps=3"], "alignlm: stages.pretrian is not a stage of this config; did you mean 'pre"),
        # the README's table said stage=dpo; Hydra advised +stage=dpo, a top-level `stage` no run reads
        (
            ["stage=dpo"],
            "alignlm: stage=dpo: the defaults pick stage as stage@stages.finetune, stage@stages.pretrain; add one more "
            "with +stage@stages.dpo=dpo and add dpo to run",
        ),
        (
            ["stages.dpo.max_steps=3"],
            "alignlm: stages.dpo is not a stage of this config; stages: ['finetune', 'pretrain']; a stage is added "
            "with +stage@stages.dpo=dpo (and named in run)",
        ),
        (["model/conector=pool2x"], "alignlm: model/conector is not a config group; did you mean 'model/connector'?"),
        (["model=tinny"], "alignlm: model=tinny: no such option of model; did you mean model=tiny? its options: ["),
        (["exp=demo"], "alignlm: exp=demo: no default picks exp, so the choice is added with a +: +exp=demo"),
        # a sweep: Hydra advised --multirun, which the command line then refused as an unknown argument
        (
            ["seed=0,1"],
            "alignlm: seed=0,1: a comma makes a Hydra sweep, and alignlm train runs one configuration: run one command "
            "per value, each under its own run_name, e.g. for s in 0 1 2; do alignlm train +exp=demo seed=$s "
            "run_name=demo_seed$s; done (a SLURM job array on a cluster; every seed reads one draw of the offline "
            "sets, offline_dataset_seed); a list is written seed=[0,1]",
        ),
        (["seed=range(0,3)"], "alignlm: seed=range(0,3): a sweep, and alignlm train runs one configuration: run one"),
        (  # each seed draws its own sets: each its own data_root
            ["offline_dataset_seed=null", "seed=0,1"],
            "alignlm: seed=0,1: a comma makes a Hydra sweep, and alignlm train runs one configuration: run one command "
            "per value, each under its own run_name, e.g. for s in 0 1 2; do alignlm train +exp=demo seed=$s "
            "run_name=demo_seed$s data_root=data/seed$s; done (a SLURM job array",
        ),
        (["run_name=x y,z"], "alignlm: run_name=x y,z: a comma makes a Hydra sweep, and alignlm train runs one"),
        (["+exp=demo", "seed=0", "-m"], "alignlm: -m/--multirun asks for a Hydra sweep, and alignlm train runs one"),
        (["--multirun"], "alignlm: -m/--multirun asks for a Hydra sweep, and alignlm train runs one configuration"),
        (["+exp=demo", "-m", "seed=0,1"], "alignlm: -m/--multirun asks for a Hydra sweep, and alignlm train runs one"),
        # a swept config group: a list there would merge the options into one run, under the last one's run_name
        (
            ["+exp=sea,contrastive"],
            "alignlm: +exp=sea,contrastive: a comma makes a Hydra sweep, and alignlm train runs one configuration: run "
            "one command per value, each under its own run_name, e.g. for v in sea contrastive; do alignlm train "
            "+exp=$v run_name=$v; done (a SLURM job array on a cluster)\n",
        ),
        # a deleted setting crashed with a traceback where it was first read, after earlier stages had trained
        (["+exp=demo", "~seed"], "alignlm: ~seed deletes a value alignlm reads (a deleted one had stopped the run"),
        (
            ["+exp=demo", "stages.finetune.max_steps=null", "~stages.finetune.epochs"],
            "alignlm: ~stages.finetune.epochs deletes a value alignlm reads (a deleted one had stopped the run where it "
            "was first read, after earlier stages trained): leave it out to keep stages.finetune.epochs=1, or set it to "
            "another value",
        ),
        (["+exp=demo", "~offline_datasets"], 'leave it out to keep offline_datasets=["digits", "shapes"]'),
        # an interpolation to no key: omegaconf's three lines, exit status 1, named as a possible library bug
        (
            ["+exp=demo", "stages.finetune.warmup_ratio=${nope}"],
            "alignlm: stages.finetune.warmup_ratio: Interpolation key 'nope' not found\n",
        ),
        # a mapping of free keys: Hydra's advice stands, on one line
        (
            ["eval.generation.temperature=0.5"],
            "alignlm: eval.generation.temperature is not in the composed config: a new key is added with a +, "
            "+eval.generation.temperature=0.5",
        ),
        # no recipe: no stage has data (a ValueError, exit status 1, when the first stage built it)
        (
            [],
            "alignlm: stages.pretrain.data.sources is empty: stage pretrain has no data to train on; start from a "
            "recipe that sets it (alignlm train +exp=demo, configs/exp/) or give stages.pretrain.data.sources=[",
        ),
    ],
)
def test_train_names_a_mistyped_override_or_a_stage_without_data_in_one_line(tmp_path, capsys, overrides, line):
    assert console(["train", f"output_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err
    assert (err.startswith(line) if line.startswith("alignlm") else line in err) and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_train_takes_its_flags_between_the_overrides(capsys):
    """`alignlm train +exp=demo --print-config seed=3`: argparse gave the overrides only the words before the flag and
    refused the rest ("unrecognized arguments: seed=3"); they are overrides, in their order, and a word that looks
    like a flag is still refused."""
    assert console(["train", "+exp=demo", "--print-config", "seed=3", "seed=4", "model=tiny"]) == 0
    out = capsys.readouterr().out
    assert "\nseed: 4\n" in out and "tiny" in out
    assert console(["train", "+exp=demo", "--print-config", "seed=3", "--verbose"]) == 2
    assert "unrecognized arguments: seed=3 --verbose" in capsys.readouterr().err


def test_print_config_checks_the_config_and_a_hydra_apps_flags_point_to_it(capsys):
    """`--print-config` printed a config the run would refuse (a deleted setting, a mistyped key) with exit status 0,
    where a Hydra user's `--cfg job` is what they check one with; it prints it and exits as the run would. `--cfg`,
    `-c`, `--info` got argparse's "unrecognized arguments" under the root's usage. A deleted stage is the user's to
    drop."""
    assert console(["train", "+exp=demo", "~seed", "--print-config"]) == 2
    assert capsys.readouterr().err.startswith("alignlm: ~seed deletes a value alignlm reads")
    assert console(["train", "+exp=demo", "~stages.finetune", "run=[pretrain]", "--print-config"]) == 0
    assert "finetune" not in capsys.readouterr().out
    # a section or a setting null by default is read as absent: deleting one is no mistake
    deleted = ["~stages.pretrain.lora", "~stages.finetune.init_from", "~monitor"]
    assert console(["train", "+exp=demo", *deleted, "--print-config"]) == 0
    capsys.readouterr()
    for flags in (["--cfg", "job"], ["-c", "job", "--package", "stages.pretrain"], ["--info"]):
        assert console(["train", "+exp=demo", *flags]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith("usage: alignlm train ")
            and (
                f"alignlm train: error: {flags[0]} is a flag of a Hydra app; alignlm composes its config with Hydra's "
                "compose API and runs no Hydra app: alignlm train <overrides> --print-config prints the composed config "
                "and checks it"
            )
            in err
        )


def test_train_refuses_an_alignlm_config_dir_that_is_no_config_tree(tmp_path, monkeypatch, capsys):
    """It fell back to the repository's configs/ without a word."""
    monkeypatch.setenv("ALIGNLM_CONFIG_DIR", str(tmp_path / "conf"))
    assert console(["train", "--print-config", "+exp=demo"]) == 2
    assert capsys.readouterr().err.startswith(f"alignlm train: ALIGNLM_CONFIG_DIR={tmp_path / 'conf'} does not exist:")


# ---- a checkpoint that is not there, reports that clash, lmms-eval missing: what to do, before any work ------------


def test_eval_of_a_checkpoint_that_does_not_exist_says_so_and_to_train_it(tmp_path, capsys, monkeypatch):
    """`alignlm eval outputs/nothere/finetune/final` said the path "is neither a final/ folder, a step checkpoint, a
    stage folder nor a run folder", as if it held the wrong files; and it left the default --out, an empty
    eval_report/ and its lock file, in the working folder."""
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    missing = tmp_path / "outputs" / "nothere" / "finetune" / "final"
    monkeypatch.chdir(tmp_path)
    assert console(["eval", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"alignlm eval: {missing} does not exist; {tmp_path / 'outputs'} holds ['demo']: train it")
    assert "neither a final/" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


def test_compare_names_the_report_files_that_repeat_a_checkpoint(tmp_path, capsys):
    """`alignlm compare reports/*/report.json` with a combined report beside its parts said "the reports repeat a
    checkpoint label: [...]", a list of every label, and not which files held the one repeated."""
    path = {"path": "/runs/a/finetune/final", "above": ""}
    a = _report(tmp_path / "a.json", _checkpoint("a/finetune/final", {"q0": 1}, **path))
    both = _report(
        tmp_path / "both.json",
        _checkpoint("a/finetune/final", {"q0": 1}, **path),
        _checkpoint("b/finetune/final", {"q0": 0}, path="/runs/b/finetune/final", above=""),
    )
    assert console(["compare", a, both]) == 2
    err = capsys.readouterr().err
    assert f"repeat a checkpoint label: a/finetune/final is in each of {a}, {both}; compare each checkpoint once" in err
    assert console(["compare", a, a]) == 2
    assert f"a/finetune/final is in {a}, given 2 times" in capsys.readouterr().err


def test_lmms_eval_missing_is_said_before_the_export_with_the_docs_recipe_not_pip_install(tmp_path):
    """scripts/eval_lmms.sh exported first (37 s with the tiny model), then `alignlm lmms-eval` said "pip install
    lmms-eval", which docs/evaluation.md says breaks alignlm's venv: the script now asks the python beside `alignlm`
    before anything else, and both point to the docs' recipe of a venv of its own."""
    import importlib.util
    import os
    import subprocess

    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed here")
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "alignlm").write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')  # any command it is asked
    (bin_dir / "python").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} "$@"\n')  # this venv's, beside it
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("weights")
    script = Path(__file__).resolve().parents[1] / "scripts" / "eval_lmms.sh"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VIRTUAL_ENV": "x", "DEVICE": "cpu"}
    proc = subprocess.run(
        ["bash", str(script), "final", "export", "mme"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2 and not calls.exists(), proc.stderr  # no export, nothing run
    recipe = "as docs/evaluation.md says (section 'lmms-eval (llava_hf)', 'Install it in its own virtualenv')"
    assert f"{bin_dir / 'python'} cannot import lmms_eval): install it in a virtualenv of its own, {recipe}" in (
        proc.stderr
    )
    with pytest.raises(SystemExit) as stopped:
        main(["lmms-eval", "--model", "llava_hf"])
    said = str(stopped.value)
    assert (
        said.startswith("lmms-eval is not installed here")
        and f"install it in a virtualenv of its own, {recipe}" in said
    )


def test_a_training_process_killed_in_native_code_prints_where_every_thread_was():
    """A rank that SIGABRT or SIGSEGV ends in C++ (a thread left running at exit, a driver fault) died with no word of
    where; ``alignlm train`` turns the fault handler on, so it prints every thread's Python stack as it dies."""
    import subprocess

    crash = "from alignlm.commands.train import report_crashes\nreport_crashes()\nimport os\nos.abort()\n"
    got = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120)
    assert (
        got.returncode != 0 and "Fatal Python error: Aborted" in got.stderr and 'File "<string>", line 4' in got.stderr
    )


def test_a_plug_in_config_group_swept_with_a_comma_is_advised_a_loop(tmp_path, capsys):
    """A plug-in's config group on hydra.searchpath swept with a comma (`+mygroup=a,b`) was advised the list form
    `+mygroup=[a,b]`, which merges the options into one run (the start-up warning says so): only the repository's
    own groups were advised a loop over their options."""
    for option in ("a", "b"):
        (tmp_path / "conf" / "mygroup").mkdir(parents=True, exist_ok=True)
        (tmp_path / "conf" / "mygroup" / f"{option}.yaml").write_text("# @package _global_\nseed: 1\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    assert console(["train", f"output_dir={tmp_path / 'out'}", search, "+mygroup=a,b"]) == 2
    err = capsys.readouterr().err
    assert "e.g. for v in a b; do alignlm train +mygroup=$v run_name=$v; done" in err and "[a,b]" not in err, err
