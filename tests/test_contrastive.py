"""Contrastive baseline: InfoNCE minimal for matched pairs, symmetric, temperature learnable or fixed, image-caption
pairing with several or no images per sample, retrieval accuracy logged, and a tiny +exp=contrastive run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignlm.constants import IGNORE_INDEX
from alignlm.data.build import build_dataset
from alignlm.data.collate import Collator
from alignlm.objectives.contrastive import ContrastiveObjective, info_nce
from alignlm.objectives.pairs import image_caption_pairs
from alignlm.pipeline import run
from tests.conftest import compose, make_batch, tiny_overrides


def test_loss_is_minimal_for_matched_pairs():
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    target = torch.arange(6)
    scale = torch.tensor(1 / 0.07)
    matched, metrics = info_nce(t, t, target, scale)
    assert metrics["i2t_acc"] == 1.0 and metrics["t2i_acc"] == 1.0
    for seed in range(5):
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
        if not torch.equal(perm, target):
            assert info_nce(t[perm], t, target, scale)[0] > matched
    noisy = F.normalize(t + 0.3 * torch.randn(6, 16, generator=g), dim=-1)
    assert info_nce(noisy, t, target, scale)[0] > matched


def test_loss_is_symmetric_in_images_and_captions():
    v, t = torch.randn(5, 8), torch.randn(5, 8)
    idx, scale = torch.arange(5), torch.tensor(10.0)
    torch.testing.assert_close(info_nce(v, t, idx, scale)[0], info_nce(t, v, idx, scale)[0])


def test_images_of_one_sample_are_not_each_others_negatives():
    """Two images equal to their shared caption: a perfect match, loss -> 0 at a sharp temperature (not log 2)."""
    t = F.normalize(torch.eye(3, 8), dim=-1)
    v = t[[0, 0, 1, 2]]
    loss, metrics = info_nce(v, t, torch.tensor([0, 0, 1, 2]), torch.tensor(100.0))
    assert loss.item() < 1e-3 and metrics["i2t_acc"] == 1.0 and metrics["t2i_acc"] == 1.0


def test_temperature_learnable_or_fixed_and_clamped():
    learn = ContrastiveObjective(temperature=0.07, learnable_temperature=True)
    fixed = ContrastiveObjective(temperature=0.07, learnable_temperature=False)
    assert [n for n, _ in learn.named_parameters()] == ["log_scale"] and list(fixed.parameters()) == []
    assert learn.scale.item() == pytest.approx(1 / 0.07) and fixed.scale.item() == pytest.approx(1 / 0.07)
    v, t = torch.randn(4, 8), torch.randn(4, 8)
    info_nce(v, t, torch.arange(4), learn.scale)[0].backward()
    assert learn.log_scale.grad is not None and learn.log_scale.grad != 0
    with torch.no_grad():
        learn.log_scale.fill_(10.0)
    assert learn.scale.item() == pytest.approx(100.0)  # CLIP's clamp: temperature never below 0.01


def test_a_learned_scale_pushed_past_the_bound_is_used_at_the_bound_and_can_come_back():
    """The parameter's value is clamped, not the graph: at the bound the loss still has a gradient (a clamp in the
    forward gave exactly 0 there, so once past the bound the temperature could never rise again)."""
    obj = ContrastiveObjective(temperature=0.07, max_scale=100.0)
    with torch.no_grad():
        obj.log_scale.fill_(math.log(100.0) + 1.0)  # where an optimizer step can leave it
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 8, generator=g)
    t = v + 3 * torch.randn(4, 8, generator=g)  # a hard batch: the loss wants a lower scale
    scale = obj.scale
    assert scale.item() == pytest.approx(100.0) and obj.log_scale.item() == pytest.approx(math.log(100.0))
    info_nce(v, t, torch.arange(4), scale)[0].backward()
    assert obj.log_scale.grad.item() > 0  # gradient descent lowers the scale back into the range


def test_the_logits_are_float32_under_bf16_autocast():
    """The trainer computes objectives under autocast; at a scale of 100 bf16 cosines (spacing 2^-8 near 1) would move
    the logits by up to 0.4. Features sharing a common direction (a modality cone) have cosines near 1."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(1, 64, generator=g)
    base = torch.randn(8, 64, generator=g)
    visual = base + 0.3 * torch.randn(8, 64, generator=g) + 3 * shared
    captions = base + 3 * shared

    def loss_and_grad(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        v = visual.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = info_nce(v, captions, torch.arange(8), torch.tensor(100.0))
        loss.backward()
        return loss.detach(), v.grad

    (want, want_grad), (got, got_grad) = loss_and_grad(False), loss_and_grad(True)
    assert got.dtype == torch.float32 and got.item() == want.item()
    torch.testing.assert_close(got_grad, want_grad, atol=0, rtol=0)


def test_pairs_follow_the_samples_images(tiny_model):
    """Sample 0 has two images, sample 1 none, sample 2 one, sample 3 one but no supervised token: three pairs over
    two captions (sample 3's image has no caption to align with)."""
    model = tiny_model()
    batch = make_batch(model, [2, 0, 1, 1])
    batch["labels"][3] = IGNORE_INDEX
    out = model(batch)
    pairs = image_caption_pairs(batch, out, model)
    assert pairs.caption_of_image.tolist() == [0, 0, 1]
    torch.testing.assert_close(pairs.visual, out.visual_tokens[:3].float().mean(1))
    table = model.llm.get_input_embeddings()
    supervised = batch["labels"] != -100
    for row, sample in ((0, 0), (1, 2)):
        ids = batch["input_ids"][sample][supervised[sample]]
        torch.testing.assert_close(pairs.captions[row], table(ids).float().mean(0))
    torch.testing.assert_close(pairs.text, pairs.captions[[0, 0, 1]])


@pytest.fixture
def samples_of_each_kind(tiny_model, colour_set, tmp_path):
    """Two captions and a question-answer record with their images, and a text-only record."""
    model = tiny_model()
    text_only = tmp_path / "text_only.json"
    turns = [{"from": "human", "value": "Say four."}, {"from": "gpt", "value": "four"}]
    text_only.write_text(json.dumps([{"id": "text", "conversations": turns}]))
    sources = [{"path": str(colour_set[k])} for k in ("instruct", "pretrain")] + [{"path": str(text_only)}]
    ds = build_dataset({"sources": sources, "template": "vicuna_v1"}, model, seed=0)
    picked = [ds[i] for i in range(len(ds)) if ds[i]["n_images"] == 0][:1]
    picked += [ds[i] for i in (0, 50, 60)]
    assert picked[0]["n_images"] == 0 and all(s["n_images"] == 1 for s in picked[1:])
    return model, picked


def test_collated_pairs_match_and_are_chosen_on_the_cpu(samples_of_each_kind):
    """Packed rows pair exactly as one sample per row; the collator's pair fields are what the model reads."""
    model, picked = samples_of_each_kind
    make = lambda **kw: Collator(  # noqa: E731
        model.tokenizer.pad_token_id, image_token_id=model.image_token_id, num_image_tokens=model.num_image_tokens, **kw
    )
    padded, packed = make()(picked), make(pack_length=2 * max(len(s["input_ids"]) for s in picked))(picked)
    assert packed["input_ids"].shape[0] < len(picked)
    assert all(isinstance(b[k], torch.Tensor) for b in (padded, packed) for k in ("pair_images", "pair_caption"))
    by_sample = {}
    for batch in (padded, packed):
        pairs = image_caption_pairs(batch, model(batch), model)
        sample = [batch["ids"][int(s)] for s in batch["image_sample"][batch["pair_images"]]]
        by_sample[len(by_sample)] = {sid: (pairs.visual[i], pairs.text[i]) for i, sid in enumerate(sample)}
    assert by_sample[0].keys() == by_sample[1].keys() and len(by_sample[0]) == 3  # the text-only sample: no pair
    for sid, (visual, text) in by_sample[0].items():
        torch.testing.assert_close(by_sample[1][sid][0], visual, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(by_sample[1][sid][1], text, rtol=1e-5, atol=1e-5)


def test_objective_logs_retrieval_and_trains_the_connector_and_handles_text_only_batches(tiny_model):
    model = tiny_model()
    obj = ContrastiveObjective(learnable_temperature=True)
    batch = make_batch(model, [1, 1, 2, 0])
    term = obj(batch, model(batch), model)
    assert set(term.metrics) == {"i2t_acc", "t2i_acc", "temperature"}
    assert 0 <= term.metrics["i2t_acc"] <= 1 and term.metrics["temperature"].item() == pytest.approx(0.07)
    term.loss.backward()
    assert model.connector.proj[0].weight.grad.abs().sum() > 0 and obj.log_scale.grad is not None
    text_only = make_batch(model, [0, 0])
    term = obj(text_only, model(text_only), model)
    assert term.loss.item() == 0.0
    term.loss.backward()


def test_tiny_contrastive_training_run(colour_set, tmp_path):
    cfg = compose(
        "+exp=contrastive",
        *tiny_overrides(
            colour_set,
            tmp_path,
            "model=tiny",
            "run=[pretrain]",
            "stages.pretrain.max_steps=3",
            "offline_datasets=[]",
            "eval.sets=[]",
        ),
    )
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert (
            math.isfinite(r["loss/contrastive"])
            and 0 <= r["contrastive/i2t_acc"] <= 1
            and 0 <= r["contrastive/t2i_acc"] <= 1
        )
    assert rows[0]["loss/total"] == pytest.approx(rows[0]["loss/lm"] + rows[0]["loss/contrastive"], rel=1e-4)


def test_learned_temperature_trains_and_resumes_exactly(colour_set, tmp_path):
    """The temperature is an optimizer group of its own (stage.lr.objectives) and is saved with step checkpoints."""
    from alignlm.training.trainer import StopTraining

    base = [
        "+exp=contrastive",
        *tiny_overrides(
            colour_set,
            tmp_path,
            "model=tiny",
            "run=[pretrain]",
            "stages.pretrain.max_steps=6",
            "offline_datasets=[]",
            "eval.sets=[]",
            "stages.pretrain.lr.objectives=0.05",
        ),
    ]
    run(compose(*base, "run_name=full"))
    with pytest.raises(StopTraining):
        run(compose(*base, "run_name=resumed", "stop_after_steps=3"))
    assert (tmp_path / "resumed" / "pretrain" / "checkpoints" / "step_000002" / "objectives.safetensors").exists()
    run(compose(*base, "run_name=resumed"))

    def rows(name: str) -> list[tuple[float, float]]:
        lines = (tmp_path / name / "pretrain" / "metrics.jsonl").read_text().splitlines()
        return [(r["loss/total"], r["contrastive/temperature"]) for r in map(json.loads, lines)]

    full = rows("full")
    assert full[0][1] == pytest.approx(0.07, rel=1e-4) and abs(full[-1][1] - 0.07) > 1e-3  # it moved
    assert rows("resumed") == [pytest.approx(r, rel=1e-6, abs=1e-7) for r in full]


def test_samples_with_the_same_caption_are_one_caption_never_each_others_negatives(tiny_model, colour_set):
    """The colour set repeats its three captions: two red squares were two captions, each the other's negative, so
    even images equal to their captions scored a loss of 0.35 and accuracies of 0.75. Grouped by their supervised
    token ids on the CPU, they are one caption with two images (VLAP's per-image captions stay as they were)."""
    model = tiny_model()
    data = build_dataset({"sources": [{"path": str(colour_set["pretrain"])}], "template": "plain"}, model, seed=0)
    samples = [data[i] for i in range(4)]  # red, green, blue, red
    batch = Collator(
        model.tokenizer.pad_token_id, image_token_id=model.image_token_id, num_image_tokens=model.num_image_tokens
    )(samples)
    assert batch["pair_samples"].tolist() == [0, 1, 2] and batch["pair_caption"].tolist() == [0, 1, 2, 0]
    with torch.no_grad():
        out = model(batch)
    pairs = image_caption_pairs(batch, out, model)
    table = model.llm.get_input_embeddings()
    for image, sample in enumerate(samples):  # each image's caption is its own sample's
        own = sample["input_ids"][sample["labels"] != IGNORE_INDEX]
        torch.testing.assert_close(pairs.text[image], table(own).float().mean(0))
    loss, metrics = info_nce(pairs.text.clone(), pairs.captions, pairs.caption_of_image, torch.tensor(100.0))
    assert loss.item() < 1e-3 and metrics["i2t_acc"] == 1.0 and metrics["t2i_acc"] == 1.0


def test_a_fixed_temperature_is_config_not_checkpoint_state():
    """A fixed temperature was a persistent buffer: saved in objectives.safetensors and loaded over the config on
    resume, so resume_allow_changes with a new temperature trained on at the old one. Now only a learned one is
    state, the resume layout tells the two apart, and a checkpoint holding a fixed one is refused, saying why."""
    from alignlm.training.checkpoint import layout

    learned, fixed = (ContrastiveObjective(learnable_temperature=flag) for flag in (True, False))
    assert list(learned.state_dict()) == ["log_scale"] and fixed.state_dict() == {}
    objectives = torch.nn.ModuleDict({"contrastive": fixed})
    assert layout(torch.nn.Linear(1, 1), objectives) == {"weight": [1, 1], "bias": [1]}
    from alignlm.training.trainer import refuse_config_held_state

    written = {"layout": {"objectives.contrastive.log_scale": [1]}}
    with pytest.raises(ValueError, match=r"ckpt holds \['objectives.contrastive.log_scale'\], which this run takes"):
        refuse_config_held_state(Path("ckpt"), written, objectives)
    refuse_config_held_state(Path("ckpt"), written, torch.nn.ModuleDict({"contrastive": learned}))


def test_an_objective_returning_a_metric_it_does_not_declare_is_refused_naming_it():
    """Ranks reduce their logged values as one table: a metric logged by some micro-batches only would change its
    width on one rank, so every metric is declared in metric_names, and an undeclared one fails at once."""
    from alignlm.objectives.base import LossTerm, check_term

    obj = ContrastiveObjective()
    check_term("stage.objectives.contrastive", obj, LossTerm(torch.zeros(()), {"temperature": torch.ones(())}))
    with pytest.raises(
        ValueError, match=r"stage.objectives.contrastive \(ContrastiveObjective\) returned metrics \['x'\]"
    ):
        check_term("stage.objectives.contrastive", obj, LossTerm(torch.zeros(()), {"x": torch.ones(())}))
