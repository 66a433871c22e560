"""Global negatives of the contrastive objective across data-parallel ranks (``gather: true``): two gloo ranks, each
with its own pairs, give one process's ``info_nce`` on the pairs concatenated (loss, and gradients after the ranks'
mean), with unequal pairs per rank, a rank without pairs, a caption on both ranks, and no pair anywhere; nothing waits
for the device; captions are named by their token ids on the device, as the collator groups them."""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from alignlm.constants import IGNORE_INDEX
from alignlm.data.collate import Collator
from alignlm.objectives.contrastive import ContrastiveObjective, info_nce
from alignlm.objectives.pairs import image_caption_pairs
from tests.conftest import RANKS, DeviceWaits, free_port, make_batch

WORLD = 2
DIM = 8
TEMPERATURE = 0.1


def scenarios() -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per scenario, each rank's pairs: pooled images ``visual``, ``captions``, ``caption_of_image``, caption ``keys``.

    ``unequal``: 3 images over 2 captions and 5 over 4, key 10 on both ranks (rank 1's copy has a vector of its own:
    only the first occurrence may count); ``text_only``: rank 0 has no pair; ``none``: no rank has one;
    ``bigger_first``: ``unequal``'s sizes on the other ranks, where slicing a rank's first-occurrence flags by its own
    caption count instead of the padded one goes wrong (with the smaller rank first the two agree)."""
    g = torch.Generator().manual_seed(0)

    def rank(keys: list[int], caption_of_image: list[int]) -> dict[str, torch.Tensor]:
        return {
            "visual": torch.randn(len(caption_of_image), DIM, generator=g),
            "captions": torch.randn(len(keys), DIM, generator=g),
            "caption_of_image": torch.tensor(caption_of_image, dtype=torch.long),
            "keys": torch.tensor(keys, dtype=torch.long),
        }

    return {
        "unequal": [rank([10, 11], [0, 0, 1]), rank([12, 10, 13, 14], [3, 1, 0, 2, 1])],
        "text_only": [rank([], []), rank([20, 21, 22], [0, 1, 2, 2])],
        "none": [rank([], []), rank([], [])],
        "bigger_first": [rank([32, 30, 33, 34], [3, 1, 0, 2, 1]), rank([30, 31], [0, 0, 1])],
    }


def _rank_main(rank: int, port: int, out: str) -> None:
    """One gloo rank: each scenario's loss and gradients (visual, captions, log-scale), and what ``DeviceWaits`` saw."""
    from alignlm.objectives.contrastive import global_info_nce, host_group

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),  # a collective one rank skipped fails here instead of hanging
    )
    objective = ContrastiveObjective(temperature=TEMPERATURE)
    results = {}
    for name, per_rank in scenarios().items():
        mine = per_rank[rank]
        visual, captions = mine["visual"].requires_grad_(), mine["captions"].requires_grad_()
        objective.log_scale.grad = None
        with DeviceWaits() as waits:
            loss, metrics = global_info_nce(
                visual,
                captions,
                mine["caption_of_image"],
                mine["keys"],
                objective.scale,
                host_group(torch.distributed.group.WORLD),
            )
            loss.backward()
        grad = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)  # noqa: E731
        results[name] = {
            "loss": loss.detach(),
            "visual": grad(visual),
            "captions": grad(captions),
            "log_scale": grad(objective.log_scale),
            "metrics": sorted(metrics),
            "waits": waits.seen,
        }
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.barrier()  # both ranks past their last collective: one torn down early aborted the other
    torch.distributed.destroy_process_group()


def run_ranks(tmp_path: Path, timeout: float = 120) -> list[dict]:
    """The two ranks' results; a rank that hangs past ``timeout`` seconds fails the test (its processes killed)."""

    context = mp.start_processes(
        _rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the gloo ranks did not finish in {timeout} s: a collective hung")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def reference(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One process's ``info_nce`` on the ranks' pairs concatenated in rank order, a caption kept at its first
    occurrence (as one collator would keep it), and each rank's gradients by its rows (a later copy of a caption: 0)."""
    visual = [r["visual"].clone().requires_grad_() for r in per_rank]
    captions = [r["captions"].clone().requires_grad_() for r in per_rank]
    kept: list[torch.Tensor] = []
    column: dict[int, int] = {}
    targets = []
    for r, pairs in enumerate(per_rank):
        for c, key in enumerate(pairs["keys"].tolist()):
            if key not in column:
                column[key] = len(kept)
                kept.append(captions[r][c])
        targets += [column[pairs["keys"][c].item()] for c in pairs["caption_of_image"].tolist()]
    log_scale = torch.tensor([math.log(1 / TEMPERATURE)], requires_grad=True)
    loss, _ = info_nce(torch.cat(visual), torch.stack(kept), torch.tensor(targets), log_scale.exp().reshape(()))
    loss.backward()
    grad = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)  # noqa: E731
    return {
        "loss": loss.detach(),
        "visual": [grad(v) for v in visual],
        "captions": [grad(c) for c in captions],
        "log_scale": log_scale.grad,
    }


@RANKS
def test_two_ranks_give_one_process_loss_and_gradients_on_the_concatenated_pairs(tmp_path):
    """The mean of the ranks' losses is the global loss, and the ranks' gradients, averaged as data parallelism
    averages them, are its gradients: each rank's feature gradient over the world size (the all-gather's backward
    sums every rank's share onto the rank the rows came from), the temperature's mean over the ranks. A rank without
    pairs enters the same collectives (the run would otherwise fail gloo's timeout) and measures no metric; with no
    pair anywhere the loss is 0 and nothing is gathered. No op waits for the device (``tests/test_training.py``'s
    check; the sizes are exchanged on the host)."""
    got = run_ranks(tmp_path)
    for name, per_rank in scenarios().items():
        ranks = [g[name] for g in got]
        assert all(r["waits"] == [] for r in ranks), (name, [r["waits"] for r in ranks])
        mean_loss = sum(r["loss"] for r in ranks) / WORLD
        mean_scale_grad = sum(r["log_scale"] for r in ranks) / WORLD
        if name == "none":
            assert mean_loss.item() == 0.0 and mean_scale_grad.item() == 0.0
            assert all(r["metrics"] == [] for r in ranks)
            continue
        want = reference(per_rank)
        torch.testing.assert_close(mean_loss, want["loss"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean_scale_grad, want["log_scale"], rtol=1e-5, atol=1e-5)
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["visual"] / WORLD, want["visual"][r], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ranks[r]["captions"] / WORLD, want["captions"][r], rtol=1e-5, atol=1e-5)
        for r, pairs in enumerate(per_rank):
            measured = ["i2t_acc", "t2i_acc"] if len(pairs["visual"]) else []
            assert ranks[r]["metrics"] == measured
    assert got[1]["unequal"]["captions"][1].abs().sum() == 0  # the later copy of key 10 is no column of its own


def test_caption_keys_follow_the_collators_rule_padded_or_packed(tiny_model, colour_set):
    """Equal supervised token ids, equal key; the same tokens in another order (the same mean embedding) or another
    text, another key; the same keys whether the micro-batch is padded or packed and wherever a sample sits in it; and
    nothing read back from the device to compute them."""
    from alignlm.data.build import build_dataset
    from alignlm.objectives.pairs import caption_keys

    model = tiny_model()
    data = build_dataset({"sources": [{"path": str(colour_set["pretrain"])}], "template": "plain"}, model, seed=0)
    samples = [data[i] for i in range(4)]  # red, green, blue, red
    swapped = {**samples[1], "id": "swapped"}
    labels = swapped["labels"].clone()
    supervised = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    labels[supervised[:2]] = labels[supervised[:2]].flip(0)  # the first two caption tokens swapped
    swapped["input_ids"] = torch.where(labels != IGNORE_INDEX, labels, swapped["input_ids"])
    swapped["labels"] = labels
    samples.append(swapped)
    make = lambda **kw: Collator(  # noqa: E731
        model.tokenizer.pad_token_id, image_token_id=model.image_token_id, num_image_tokens=model.num_image_tokens, **kw
    )
    by_batch = []
    for order in (samples, samples[::-1]):  # other rows, other sample ids: what another rank holds
        for collate in (make(), make(pack_length=3 * max(len(s["input_ids"]) for s in samples))):
            batch = collate(order)
            with DeviceWaits() as waits:
                keys = caption_keys(batch, model)
            assert waits.seen == []
            assert keys.shape == batch["pair_samples"].shape
            assert len(set(keys.tolist())) == 4  # red, green, blue, green swapped: the collator's classes
            owners = batch["image_sample"][batch["pair_images"]].tolist()  # the sample of each paired image
            by_batch.append({batch["ids"][s]: keys[c].item() for s, c in zip(owners, batch["pair_caption"].tolist())})
    assert all(keys == by_batch[0] for keys in by_batch[1:])
    assert by_batch[0][samples[0]["id"]] == by_batch[0][samples[3]["id"]]  # the two red squares


def test_a_caption_is_a_column_at_its_first_real_occurrence():
    """Padding rows (not real) never count, not even where their key equals a real caption's ahead of it."""
    from alignlm.objectives.contrastive import first_occurrences

    keys = torch.tensor([5, 5, 7, 5, 0, 7])
    real = torch.tensor([False, True, True, True, False, True])
    assert first_occurrences(keys, real).tolist() == [False, True, True, False, False, False]


def test_one_process_is_the_local_loss_and_gather_is_validated(tiny_model):
    """Without a process group of several ranks ``gather: true`` is the local loss, number for number."""
    model = tiny_model()
    batch = make_batch(model, [1, 2, 0, 1])
    out = model(batch)
    term = ContrastiveObjective(gather=True)(batch, out, model)
    pairs = image_caption_pairs(batch, out, model)
    loss, metrics = info_nce(pairs.visual, pairs.captions, pairs.caption_of_image, torch.tensor(1 / 0.07))
    assert term.loss.item() == loss.item() and term.metrics["i2t_acc"] == metrics["i2t_acc"]
    with pytest.raises(ValueError, match="contrastive gather must be true or false, got 'yes'"):
        ContrastiveObjective(gather="yes")


def _stand_in_rank(rank: int, port: int, out: str, data: str) -> None:
    """One gloo rank of a tiny contrastive stage: one step, rank 0 on the first 4 records, rank 1 on a stand-in for a
    micro-batch of bad data; rank 0 saves the step's logged row."""
    _two_rank_env(rank, port)
    trainer = _contrastive_trainer(Path(data), Path(out) / "ranks")
    bad = {"input_ids": None, "skipped": [], "lm_targets": []}
    micro = trainer.collator()([trainer.dataset[i] for i in range(4)]) if rank == 0 else bad
    rows = trainer.fetch([trainer.step([micro], 1)])
    if rank == 0:
        torch.save(rows[0][1], Path(out) / "ranks.pt")
    trainer.acc.wait_for_everyone()
    torch.distributed.destroy_process_group()  # gloo's threads ended before exit (one aborted the process otherwise)


def _contrastive_trainer(data: Path, out: Path, learnable: bool = False):
    from alignlm.config import compose
    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer
    from tests.conftest import tiny_overrides

    sets = {k: data / f"{k}.json" for k in ("pretrain", "instruct", "test")}
    cfg = compose(
        tiny_overrides(
            sets,
            out,
            "+objective@stages.pretrain.objectives.contrastive=contrastive",
            f"stages.pretrain.objectives.contrastive.learnable_temperature={str(learnable).lower()}",
        )
    )
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    trainer.setup()
    return trainer


def two_ranks_and_one(main, tmp_path: Path, monkeypatch, learnable: bool = False) -> tuple[dict, dict]:
    """The logged row of one step of a tiny contrastive stage on two gloo ranks (``main`` on each, rank 0 saving its
    row) and on one process over the first 4 records."""
    from tests.conftest import write_colour_set

    data = write_colour_set(tmp_path / "data", n=8)["pretrain"].parent
    context = mp.start_processes(
        main, args=(free_port(), str(tmp_path), str(data)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the gloo ranks did not finish: a collective hung")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    one = _contrastive_trainer(data, tmp_path / "one", learnable=learnable)
    theirs = one.fetch([one.step([one.collator()([one.dataset[i] for i in range(4)])], 1)])[0][1]
    ours = torch.load(tmp_path / "ranks.pt")
    return ours, theirs


@RANKS
def test_a_rank_standing_in_for_bad_data_leaves_the_gathered_loss_its_weight(tmp_path, monkeypatch):
    """Rank 1's micro-batch was all bad data: the gathered contrastive loss of the step is rank 0's pairs' alone, as
    one process on rank 0's batch computes it (it was weighed as a per-rank mean over the ranks' micro-batches of
    data, twice its value: loss and gradient doubled); the LM loss, a per-rank mean, was and is right."""
    ours, theirs = two_ranks_and_one(_stand_in_rank, tmp_path, monkeypatch)
    for key in ("loss/total", "loss/lm", "loss/contrastive", "grad_norm"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


def _two_rank_env(rank: int, port: int) -> None:
    """This process as gloo rank ``rank`` of two on the CPU, as a launcher would set it up."""
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        ACCELERATE_USE_CPU="1",
    )
    torch.set_num_threads(1)


def _learnable_rank(rank: int, port: int, out: str, data: str) -> None:
    """One gloo rank of a contrastive stage with a learned temperature: one step on its two of the first 4 records."""
    _two_rank_env(rank, port)
    trainer = _contrastive_trainer(Path(data), Path(out) / "ranks", learnable=True)
    rows = trainer.fetch(
        [trainer.step([trainer.collator()([trainer.dataset[i] for i in (2 * rank, 2 * rank + 1)])], 1)]
    )
    if rank == 0:
        torch.save(rows[0][1], Path(out) / "ranks.pt")
    trainer.acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


@RANKS
def test_two_ranks_average_a_learned_temperatures_gradient_as_one_process_on_their_samples(tmp_path, monkeypatch):
    """An objective's parameters live outside the DDP model and the trainer averages their gradients itself: a sum
    had doubled the temperature's gradient on two ranks (the logged gradient norm, the clipping, an SGD update), and
    the two-rank tests had fixed the temperature."""
    ours, theirs = two_ranks_and_one(_learnable_rank, tmp_path, monkeypatch, learnable=True)
    for key in ("loss/total", "loss/contrastive", "grad_norm"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
