"""Preference tuning (the dpo stage): the loss is the formula, the reference is the starting model (adapters disabled
equals a frozen copy), masks cover the final answer only, and a stage trains, checkpoints and resumes exactly."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from alignlm.constants import IGNORE_INDEX
from alignlm.data.build import build_dataset
from alignlm.data.collate import Collator, Skipped
from alignlm.objectives.preference import PreferenceObjective, preference_loss
from alignlm.pipeline import run
from alignlm.training.stages import apply_stage
from alignlm.training.trainer import StopTraining
from tests.conftest import COLOURS, RANKS, compose, read_losses, tiny_overrides, waits_in_training_steps


def write_preferences(colour_set: dict[str, Path]) -> Path:
    """Each colour question with its right answer chosen and a wrong one rejected; every fourth record asks a second,
    follow-up question after an earlier answer (whose tokens must not be supervised)."""
    path = Path(colour_set["instruct"]).parent / "preferences.json"
    names = list(COLOURS)
    records = []
    for i in range(24):
        right, wrong = names[i % 3], names[(i + 1) % 3]
        turns = [{"from": "human", "value": "<image>\nWhat color is it?"}]
        if i % 4 == 3:
            turns += [{"from": "gpt", "value": "A square."}, {"from": "human", "value": "And its color?"}]
        records.append(
            {"id": f"d{i}", "image": f"images/{i}.png", "conversations": turns, "chosen": right, "rejected": wrong}
        )
    path.write_text(json.dumps(records))
    return path


def dpo_stage(colour_set, tmp_path, *extra: str) -> list[str]:
    prefs = write_preferences(colour_set)
    return [
        *tiny_overrides(colour_set, tmp_path, "eval.sets=[]"),
        "+stage@stages.dpo=dpo",
        "run=[finetune,dpo]",
        "stages.finetune.init_from=null",
        "stages.finetune.data.template=chat",
        "stages.dpo.data.template=chat",
        f"stages.dpo.data.sources=[{{path:{prefs}}}]",
        "stages.dpo.per_device_batch_size=4",
        "stages.dpo.max_steps=6",
        "stages.dpo.save_every=3",
        "mixed_precision=no",
        *extra,
    ]


def pair_batch(model, colour_set, tmp_path) -> dict:
    cfg = compose(*dpo_stage(colour_set, tmp_path))
    dataset = build_dataset(cfg.stages.dpo.data, model, 0)
    collate = Collator(
        model.tokenizer.pad_token_id, image_token_id=model.image_token_id, num_image_tokens=model.num_image_tokens
    )
    return collate([dataset[i] for i in range(4)])


def test_the_loss_is_the_formula_on_hand_computed_log_probabilities():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.0))
    h, beta = (-1.0 + 1.5) - (-2.0 + 1.0), 0.5  # 1.5
    assert preference_loss(pc, pr, rc, rr, beta).item() == pytest.approx(math.log1p(math.exp(-beta * h)))
    smoothed = 0.8 * math.log1p(math.exp(-beta * h)) + 0.2 * math.log1p(math.exp(beta * h))
    assert preference_loss(pc, pr, rc, rr, beta, label_smoothing=0.2).item() == pytest.approx(smoothed)
    assert preference_loss(pc, pr, rc, rr, beta, loss="ipo").item() == pytest.approx((h - 1 / (2 * beta)) ** 2)


def test_pairs_are_numbered_among_the_kept_items_when_a_record_before_them_was_skipped():
    """The objective's per-pair buffers hold num_samples // 2 pairs: a pair numbered by its place in the micro-batch
    (counting a skipped record) indexed past them."""

    def answer(last: int) -> dict:
        return {
            "id": "r",
            "input_ids": torch.tensor([1, 2, last]),
            "labels": torch.tensor([IGNORE_INDEX, 2, last]),
            "n_images": 0,
        }

    items = [Skipped("bad", "OSError"), (answer(3), answer(4)), Skipped("worse", "OSError"), (answer(5), answer(6))]
    batch = Collator(pad_token_id=0)(items)
    assert batch["pair"].tolist() == [0, 0, 1, 1] and batch["chosen"].tolist() == [True, False, True, False]
    assert len(batch["skipped"]) == 2 and batch["num_samples"] == 4
    obj = PreferenceObjective()
    obj.reference = "adapters"
    reference = torch.tensor([-1.0, -2.0, -3.0, -1.0])
    obj.reference_logps = lambda batch, model: reference
    policy = torch.tensor([-0.5, -2.5, -2.0, -1.5], requires_grad=True)
    term = obj(batch, SimpleNamespace(sample_logps=policy), None)
    want = preference_loss(policy[[0, 2]], policy[[1, 3]], reference[[0, 2]], reference[[1, 3]], obj.beta).mean()
    torch.testing.assert_close(term.loss, want)


def test_masks_cover_the_final_answer_only(tiny_model, colour_set, tmp_path):
    """Chosen and rejected share the prompt token for token; only the final answer (and the template's end of turn)
    is supervised, also after an earlier answer in the prompt."""
    model = tiny_model()
    cfg = compose(*dpo_stage(colour_set, tmp_path))
    dataset = build_dataset(cfg.stages.dpo.data, model, 0)
    records = {r["id"]: r for r in json.loads(write_preferences(colour_set).read_text())}
    follow_ups = 0
    for i in range(len(dataset)):
        chosen, rejected = dataset[i]
        record = records[chosen["id"]]
        follow_ups += len(record["conversations"]) > 1
        for sample, answer in ((chosen, record["chosen"]), (rejected, record["rejected"])):
            supervised = (sample["labels"] != IGNORE_INDEX).nonzero().squeeze(1)
            start = int(supervised[0])
            assert supervised.tolist() == list(range(start, start + len(supervised)))  # one contiguous run
            text = model.tokenizer.decode(sample["labels"][supervised])
            assert text.startswith(answer) and "A square" not in text
        start = int((chosen["labels"] != IGNORE_INDEX).nonzero()[0])
        assert torch.equal(chosen["input_ids"][:start], rejected["input_ids"][:start])
    assert follow_ups > 0


def test_zero_margin_while_the_policy_is_the_reference(tiny_model, colour_set, tmp_path):
    model = tiny_model()
    apply_stage(model, {"vision": "frozen", "connector": "frozen", "llm": "lora"}, {"r": 4, "alpha": 8, "dropout": 0.0})
    dpo = PreferenceObjective(beta=0.1)
    dpo.setup(model, None)
    assert dpo.reference == "adapters"
    batch = pair_batch(model, colour_set, tmp_path)
    term = dpo(batch, model(batch, sample_logps=True), model)
    assert term.metrics["rewards/margin"].item() == 0.0 and term.loss.item() == pytest.approx(math.log(2))


def test_adapters_disabled_reference_equals_a_frozen_copy(tiny_model, colour_set, tmp_path):
    model = tiny_model()
    before = copy.deepcopy(model).eval()
    apply_stage(model, {"vision": "frozen", "connector": "frozen", "llm": "lora"}, {"r": 4, "alpha": 8, "dropout": 0.0})
    with torch.no_grad():  # adapters that change the answers (LoRA's B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = pair_batch(model, colour_set, tmp_path)
    adapters, frozen = PreferenceObjective(reference="adapters"), PreferenceObjective(reference="copy")
    adapters.setup(model, None)
    frozen.setup(before, None)  # a copy of the weights before the adapters
    reference = adapters.reference_logps(batch, model)
    assert torch.allclose(reference, frozen.reference_logps(batch, before), atol=1e-5)
    assert not torch.allclose(reference, model(batch, sample_logps=True).sample_logps, atol=1e-3)
    with pytest.raises(ValueError, match="reference=adapters needs a stage whose only trained parameters"):
        PreferenceObjective(reference="adapters").setup(before, None)  # everything trainable: no adapters to disable


def test_a_dpo_stage_learns_the_preferences_and_resumes_exactly(colour_set, tmp_path):
    """finetune -> dpo (LoRA, reference = adapters disabled): the chosen answers gain reward; stopped after step 3
    and resumed, every loss equals the uninterrupted run's."""
    run(compose(*dpo_stage(colour_set, tmp_path, "run_name=full")))
    with pytest.raises(StopTraining):
        run(compose(*dpo_stage(colour_set, tmp_path, "run_name=cut", "stop_after_steps=3")))
    run(compose(*dpo_stage(colour_set, tmp_path, "run_name=cut")))
    full = read_losses(tmp_path / "full" / "dpo")
    assert len(full) == 6 and read_losses(tmp_path / "cut" / "dpo") == full  # bit for bit
    rows = [json.loads(r) for r in (tmp_path / "full" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as its reference
    assert rows[-1]["dpo/rewards/margin"] > 0 and rows[-1]["loss/dpo"] < math.log(2)
    assert sum(r["dpo/rewards/accuracy"] for r in rows[1:]) / 5 > 0.5  # the chosen answers mostly gain more
    assert (tmp_path / "full" / "dpo" / "final" / "model.safetensors").exists()


def test_a_dpo_step_reads_nothing_back_from_the_device(colour_set, tmp_path):
    """Chosen and rejected sequences, the policy's and the reference's log-probabilities, CUDA's fused AdamW: no op
    that would wait for a GPU or lacks a deterministic CUDA kernel (tests/test_training.py has the same check for the
    other stages)."""
    cfg = compose(
        *dpo_stage(colour_set, tmp_path, "run=[dpo]", "stages.dpo.init_from=null", "stages.dpo.fused_optimizer=true")
    )
    ops, rows = waits_in_training_steps(cfg, "dpo")
    assert ops.seen == [] and len(rows) == 2


def test_preference_records_that_cannot_be_used_are_counted(tiny_model, colour_set, tmp_path):
    model = tiny_model()
    good = json.loads(write_preferences(colour_set).read_text())[:8]
    bad = [
        {**good[0], "id": "same", "rejected": good[0]["chosen"]},
        {**good[3], "id": "spaced", "rejected": f" {good[3]['chosen']}\n"},  # the templates strip answers
        {k: v for k, v in good[1].items() if k != "rejected"} | {"id": "none"},
        {**good[2], "id": "answered", "conversations": [*good[2]["conversations"], {"from": "gpt", "value": "x"}]},
    ]
    path = Path(colour_set["instruct"]).parent / "preferences_bad.json"
    path.write_text(json.dumps(good + bad))
    cfg = compose(*dpo_stage(colour_set, tmp_path, f"stages.dpo.data.sources=[{{path:{path}}}]"))
    dataset = build_dataset(cfg.stages.dpo.data, model, 0)
    assert len(dataset) == 8 and dataset.report.counts == {"malformed record": 4}


def test_a_cut_that_leaves_both_answers_the_same_tokens_is_too_long(tiny_model, colour_set, tmp_path):
    """Answers that start alike, cut by data.max_length inside their common start, were two equal samples: a pair
    with no preference in it (loss log 2, no gradient) that counted as kept. It is data too long to cut."""
    from alignlm.data.records import TOO_LONG, DataError

    model = tiny_model()
    record = json.loads(write_preferences(colour_set).read_text())[0]
    shared = "It is a colour of the rainbow and of many flags, namely"
    record |= {"chosen": f"{shared} red.", "rejected": f"{shared} blue."}
    path = Path(colour_set["instruct"]).parent / "preferences_alike.json"
    path.write_text(json.dumps([record]))
    stage = dpo_stage(
        colour_set, tmp_path, f"stages.dpo.data.sources=[{{path:{path}}}]", "stages.dpo.data.on_error=raise"
    )
    chosen, rejected = build_dataset(compose(*stage).stages.dpo.data, model, 0)[0]
    assert not torch.equal(chosen["input_ids"], rejected["input_ids"])
    answer = int((chosen["labels"] != IGNORE_INDEX).nonzero()[0])
    cut = compose(*stage, f"stages.dpo.data.max_length={answer + 4}").stages.dpo.data
    with pytest.raises(DataError, match="leaves 'chosen' and 'rejected' the same tokens") as e:
        build_dataset(cut, model, 0)[0]
    assert e.value.cause == TOO_LONG


@RANKS
def test_two_data_parallel_ranks_train_like_one_process(colour_set, tmp_path, monkeypatch):
    """The pair index is local to a micro-batch and the loss a mean over pairs: 2 gloo ranks of 2 pairs each give one
    process's losses with 4 pairs a step (fp32, rel. 1e-5)."""
    from tests.test_cluster import torchrun

    job = dpo_stage(
        colour_set, tmp_path, "run_name=ddp", "stages.dpo.per_device_batch_size=2", "stages.dpo.save_every=0"
    )
    proc = torchrun(job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    run(compose(*dpo_stage(colour_set, tmp_path, "run_name=one", "stages.dpo.save_every=0")))
    assert read_losses(tmp_path / "ddp" / "dpo") == pytest.approx(read_losses(tmp_path / "one" / "dpo"), rel=1e-5)


def dpo_trainer(colour_set, tmp_path) -> tuple[Any, dict, dict]:
    """A dpo stage's trainer (its LoRA frozen at lr 0: a micro-batch gives the same loss at every step), a micro-batch
    of its data, and one whose every pair was bad data (the trainer replaces it by an empty stand-in)."""
    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer

    cfg = compose(*dpo_stage(colour_set, tmp_path, "run=[dpo]", "stages.dpo.init_from=null", "stages.dpo.lr.llm=0"))
    trainer = Trainer(cfg, "dpo", make_accelerator(cfg))
    trainer.setup()
    return trainer, next(iter(trainer.loader())), trainer.collator()([Skipped("gone", "OSError")])


def test_the_batch_fields_are_checked_on_the_first_micro_batch_of_data_not_a_stand_in(colour_set, tmp_path):
    """When step 1's first micro-batch was bad data, the check read its stand-in and failed with "objective dpo needs
    batch fields ['pair', 'chosen']", data that was in fact there."""
    trainer, good, bad = dpo_trainer(colour_set, tmp_path)
    trainer.step([bad, good], 1)
    fresh, _, _ = dpo_trainer(colour_set, tmp_path / "fresh")
    with pytest.raises(KeyError, match=r"objective dpo needs batch fields \['pair'\]"):  # data lacking one still fails
        fresh.step([bad, {k: v for k, v in good.items() if k != "pair"}], 1)


def test_a_stand_in_for_bad_data_does_not_scale_a_per_micro_batch_loss(colour_set, tmp_path):
    """The stand-in counted in the micro-batches the DPO loss was averaged over, halving its gradient and logged
    loss: a step is now the mean over its micro-batches of data, as one big batch without the bad ones."""
    trainer, good, bad = dpo_trainer(colour_set, tmp_path)
    logs = [trainer.step([good], 1), trainer.step([bad, good], 2)]
    rows = {step: row for step, row, *_ in trainer.fetch(logs)}
    assert rows[2]["loss/dpo"] == pytest.approx(rows[1]["loss/dpo"]) and rows[1]["loss/dpo"] > 0
    assert rows[2]["loss/total"] == pytest.approx(rows[1]["loss/total"])
    assert rows[2]["dpo/rewards/margin"] == pytest.approx(rows[1]["dpo/rewards/margin"])


def test_a_frozen_copy_reference_under_autocast_is_stored_half_and_gives_the_policys_numbers(
    tiny_model, colour_set, tmp_path
):
    """reference=copy under bf16 autocast: its linear layers go to bf16 (half the copy's memory) at the first use, and
    while the policy is the reference the margin is exactly zero and the loss log 2."""
    model = tiny_model()
    apply_stage(model, {"vision": "frozen", "connector": "full", "llm": "full"}, None)
    dpo = PreferenceObjective(beta=0.1)
    dpo.setup(model, None)
    assert dpo.reference == "copy"
    batch = pair_batch(model, colour_set, tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        term = dpo(batch, model(batch, sample_logps=True), model)
    linears = [m for m in dpo.frozen_reference.llm.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the policy is untouched
    assert term.metrics["rewards/margin"].item() == 0.0 and term.loss.item() == pytest.approx(math.log(2))


def test_ipo_targets_a_margin_of_half_over_beta():
    """IPO is (h - 1/(2 beta))^2; the one check there was (h 1.5, beta 0.5) gives 0.25 for (h - 1/beta)^2 too."""
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.0))  # h = 1.5
    for beta in (0.1, 0.25, 2.0):
        assert preference_loss(pc, pr, rc, rr, beta, loss="ipo").item() == pytest.approx((1.5 - 1 / (2 * beta)) ** 2)


def test_auto_reference_is_a_copy_when_the_stage_trains_more_than_lora_adapters(tiny_model):
    """``auto`` disables the adapters only when every trained parameter is one: with the connector trained too, the
    adapters-off model moves with the connector, and would not be the starting model."""
    model = tiny_model()
    apply_stage(model, {"connector": "full", "llm": "lora"}, {"r": 4, "alpha": 8, "dropout": 0.0})
    objective = PreferenceObjective(reference="auto")
    objective.setup(model, None)
    assert objective.reference == "copy"
    with pytest.raises(ValueError, match="reference=adapters needs a stage whose only trained parameters"):
        PreferenceObjective(reference="adapters").setup(model, None)


def rewards_of(policy: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """The logged metrics of a DPO step (beta 0.1) on two pairs, the first answer of each chosen."""
    objective = PreferenceObjective(beta=0.1, reference="copy")
    objective.reference_logps = lambda batch, model: reference.clone()
    batch = {"pair": torch.tensor([0, 0, 1, 1]), "chosen": torch.tensor([1, 0, 1, 0]), "num_samples": 4}
    term = objective(batch, SimpleNamespace(sample_logps=policy.clone(), lm_loss=torch.zeros(())), None)
    return {k: v.item() for k, v in term.metrics.items()} | {"loss": term.loss.item()}


def test_logged_rewards_are_beta_times_the_log_ratio_and_a_tie_is_no_right_preference():
    """The implicit rewards are beta (log pi - log ref), as TRL logs them (without beta they read 10x at beta 0.1);
    a tie (the policy is the reference: step 1 of every DPO stage) is no pair preferred rightly (1.0 had been logged
    there)."""
    got = rewards_of(torch.tensor([-3.0, -5.0, -2.0, -2.5]), torch.tensor([-4.0, -4.0, -2.5, -2.0]))
    chosen, rejected = 0.1 * torch.tensor([1.0, 0.5]), 0.1 * torch.tensor([-1.0, -0.5])
    assert got["rewards/chosen"] == pytest.approx(chosen.mean().item())
    assert got["rewards/rejected"] == pytest.approx(rejected.mean().item())
    assert got["rewards/margin"] == pytest.approx((chosen - rejected).mean().item())
    same = torch.tensor([-3.0, -5.0, -2.0, -2.5])
    tie = rewards_of(same, same)
    assert tie["rewards/margin"] == 0.0 and tie["rewards/accuracy"] == 0.0 and tie["loss"] == pytest.approx(math.log(2))
