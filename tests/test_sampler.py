"""Data order: every rank and micro-batch gets a fixed slice of each global batch; grouping keeps epochs exact."""

from __future__ import annotations

import pytest
import torch

from alignlm.training.sampler import StepSampler


def micro_batches(**kw) -> list[list[int]]:
    return list(
        StepSampler(
            **{
                "num_samples": 40,
                "per_device": 2,
                "world": 1,
                "rank": 0,
                "accum": 1,
                "seed": 3,
                "total_steps": 10,
                **kw,
            }
        )
    )


def test_ranks_and_accumulation_partition_the_same_global_batches():
    one = micro_batches(accum=2)
    ranks = [micro_batches(world=2, rank=r) for r in range(2)]
    for step in range(10):
        assert sorted(one[2 * step] + one[2 * step + 1]) == sorted(ranks[0][step] + ranks[1][step])


def test_resume_continues_with_the_same_batches():
    assert micro_batches(start_step=4) == micro_batches()[4:]


@pytest.mark.parametrize("lengths", [None, [i % 7 for i in range(40)]])
def test_each_epoch_visits_every_sample_once(lengths):
    s = StepSampler(40, 2, 1, 0, 1, seed=0, total_steps=40, lengths=lengths, group_size=4)
    for epoch in range(2):
        seen = s.epoch_batches(epoch).flatten()
        assert sorted(seen.tolist()) == list(range(40))


def test_length_grouping_reduces_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 200, (256,), generator=g).tolist()

    def padding(s: StepSampler) -> int:
        batches = s.epoch_batches(0).view(-1, s.per_device)  # micro-batches
        lens = torch.tensor(lengths)[batches]
        return int((lens.max(1).values[:, None] - lens).sum())

    plain = StepSampler(256, 8, 1, 0, 1, seed=0, total_steps=32)
    banded = StepSampler(256, 8, 1, 0, 1, seed=0, total_steps=32, lengths=lengths, grouping="band")
    assert padding(banded) < padding(plain) / 3
    kw = {"per_device": 2, "world": 8, "rank": 0, "accum": 2, "seed": 0, "total_steps": 8}
    stepped = StepSampler(256, **kw, lengths=lengths)  # each micro-step of 8 ranks sorted across them
    assert padding(stepped) < padding(StepSampler(256, **kw)) / 3


def test_grouping_within_a_step_keeps_every_micro_steps_samples():
    """``band`` made each global batch a band of similar lengths, which changes the objective (a token mean over the
    step: a short caption weighed as much as a long one); ``step`` sorts each micro-step's samples across its ranks
    only, so every micro-step holds what it holds unsorted (sorted across the accumulation too, a per-micro-batch
    objective such as the contrastive loss saw other batches: 4.5 % off)."""
    lengths = [(i * 37) % 101 for i in range(96)]
    kw = {"per_device": 3, "world": 2, "rank": 0, "accum": 2, "seed": 3, "total_steps": 16}
    plain, stepped = StepSampler(96, **kw), StepSampler(96, **kw, lengths=lengths)
    for epoch in range(2):
        a, b = (s.epoch_batches(epoch).view(-1, 6).tolist() for s in (plain, stepped))  # micro-steps of 2 ranks
        assert [sorted(r) for r in a] == [sorted(r) for r in b]
        assert all(lengths[x] >= lengths[y] for row in b for x, y in zip(row, row[1:]))


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        micro_batches(num_samples=3, per_device=4)


def test_a_fractional_mixture_weight_draws_a_fresh_share_each_epoch():
    """Sources of 100 records at weight 1 and 20 at weight 0.5: each epoch shows 10 of the 20, a different 10 (the
    share was drawn once per run, so half the source was never seen), and resume still continues exactly."""
    kw = {"per_device": 2, "world": 1, "rank": 0, "accum": 1, "seed": 5, "total_steps": 550}
    s = StepSampler(120, **kw, pools=[(100, 120, 10)])
    assert s.epoch_size == 110 and s.steps_per_epoch == 55
    seen = set()
    for epoch in range(10):
        batch = s.epoch_batches(epoch).flatten().tolist()
        assert len(set(batch)) == len(batch) and sum(i >= 100 for i in batch) <= 10
        seen |= {i for i in batch if i >= 100}
    assert seen == set(range(100, 120))
    assert list(StepSampler(120, **{**kw, "start_step": 70}, pools=[(100, 120, 10)])) == list(s)[70:]


def test_group_by_length_true_is_the_banding_it_always_was():
    """A run started when ``true`` was the only grouping resumes with its own order."""
    from alignlm.training.trainer import length_grouping

    assert [length_grouping({"group_by_length": v}) for v in (True, "band", "step", False)] == [
        "band",
        "band",
        "step",
        None,
    ]
    assert length_grouping({}) == "step"


@pytest.mark.parametrize(
    ("objective", "connector", "relating"),
    [
        ("lm", "mlp2x_gelu", []),
        ("contrastive", "mlp2x_gelu", []),  # gathers the ranks' micro-batches: each step's sum is the same
        ("contrastive", "moe", ["model.connector"]),
        ("lm", "v2l", ["model.connector"]),  # its losses: means over the micro-batch's image tokens
        ("sea", "mlp2x_gelu", ["objectives.sea"]),  # a mean over the micro-batch's labelled tokens
        ("vlap", "mlp2x_gelu", ["objectives.vlap"]),
    ],
)
def test_step_grouping_keeps_each_ranks_micro_batch_where_something_relates_its_samples(
    tiny_model, monkeypatch, objective, connector, relating
):
    """Sorted across the ranks, each rank's micro-batch is a band of lengths (the longest on rank 0): a loss that is a
    mean over a rank's micro-batch (a contrast without gathering, a transport, SEA's labelled tokens, an MoE balance,
    V2L's image tokens, which a sort piling the images onto rank 0 halved) changed, though the docs said no number did.
    Then the micro-steps stay unsorted on every rank; one rank keeps the sort."""
    import logging

    from alignlm.training.trainer import build_objectives, rank_batches_kept, sample_relations
    from tests.conftest import compose

    monkeypatch.setattr("alignlm.objectives.contrastive.data_parallel", lambda: True)  # as on several ranks
    overrides = [f"model/connector={connector}"] if connector != "mlp2x_gelu" else []
    if objective != "lm":
        overrides.append(f"+objective@stages.pretrain.objectives.{objective}={objective}")
    cfg = compose(*overrides)
    objectives = build_objectives(cfg.stages.pretrain)
    found = sample_relations(tiny_model(*overrides), objectives)
    assert found == relating
    if objective == "contrastive":
        no_gather = build_objectives(
            compose(*overrides, "stages.pretrain.objectives.contrastive.gather=false").stages.pretrain
        )
        assert "objectives.contrastive" in sample_relations(tiny_model(*overrides), no_gather)
    lengths = [(i * 37) % 101 for i in range(96)]
    kw = {"per_device": 3, "rank": 0, "accum": 2, "seed": 3, "total_steps": 16, "lengths": lengths}
    for world in (1, 2):
        order = StepSampler(96, world=world, **kw)
        kept = rank_batches_kept(order, found, logging.getLogger("test"), "pretrain")
        unsorted = StepSampler(96, world=world, **{**kw, "lengths": None})
        want = unsorted if found and world > 1 else order
        assert torch.equal(kept.epoch_batches(0), want.epoch_batches(0))


def test_a_trainable_tower_with_batch_normalisation_relates_a_micro_batchs_samples(tiny_model):
    """Each micro-batch normalised by its own statistics: a sort across the ranks changed them. Frozen, it runs in
    eval mode on its running statistics, and relates nothing."""
    from torch import nn

    from alignlm.training.trainer import sample_relations

    model = tiny_model()
    model.vision.add_module("norm", nn.BatchNorm1d(4))
    model.frozen_parts = set()
    assert sample_relations(model, {}) == ["model.vision"]
    model.frozen_parts = {"vision"}
    assert sample_relations(model, {}) == []


def test_the_ranks_micro_step_together_hold_one_process_micro_batch_of_the_same_step():
    """Micro-step a of the W ranks (what they train on at once: a gathered contrastive batch, a step's length sort) is
    micro-batch a of one process with W times the per-device batch; a [world, accum] view had kept every sample and
    every step's batch but given rank 0 the first micro-steps' samples and rank 1 the last ones."""
    for lengths in (None, [((i * 7919) % 53) + 1 for i in range(40)]):
        kw = dict(num_samples=40, accum=2, seed=3, total_steps=6, lengths=lengths)
        ranks = [list(StepSampler(per_device=2, world=2, rank=r, **kw)) for r in range(2)]
        one = list(StepSampler(per_device=4, world=1, rank=0, **kw))
        for i, micro in enumerate(one):
            assert sorted(ranks[0][i] + ranks[1][i]) == sorted(micro)


def test_band_grouping_shuffles_its_batches_not_longest_first():
    """``band`` sorts each group by length and cuts it into batches, then shuffles the batches: unshuffled, every epoch
    ran its batches longest first (a curriculum nobody asked for)."""
    lengths = list(range(1, 65))
    for seed in range(3):
        sampler = StepSampler(
            num_samples=64,
            per_device=4,
            world=1,
            rank=0,
            accum=1,
            seed=seed,
            total_steps=16,
            lengths=lengths,
            grouping="band",
            group_size=16,
        )
        means = [sum(lengths[i] for i in b) / len(b) for b in sampler]
        assert means != sorted(means, reverse=True)
