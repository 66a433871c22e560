"""The global alignment objectives (contrastive, VLAP) under sharded training, one process on the CPU: they read the
captions' token embeddings from the model's output, not from a second lookup in a table that FSDP2 has resharded
after the forward, and VLAP gathers the whole embedding table that ZeRO-3 or FSDP2 holds in parts. On one plain
process the numbers and the table's gradient are those of the second lookup they replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignlm.objectives import pairs
from alignlm.objectives.contrastive import ContrastiveObjective
from alignlm.objectives.vlap import VLAPObjective
from alignlm.pipeline import run
from tests.conftest import compose, make_batch, tiny_overrides


def metric_rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def sharded_and_plain(colour_set, tmp_path: Path, objective: str, *sharded: str, extra: tuple[str, ...] = ()):
    """Two steps of ``+exp=<objective>`` pretraining on the tiny model, sharded as ``sharded`` asks and on one plain
    process: both runs' logged rows."""
    job = [
        f"+exp={objective}",
        *tiny_overrides(colour_set, tmp_path, "model=tiny", "run=[pretrain]", "offline_datasets=[]", "eval.sets=[]"),
        "stages.pretrain.max_steps=2",
        "stages.pretrain.save_every=0",
        *extra,
    ]
    cfg = compose(*job, "run_name=sharded", *sharded)
    assert cfg.distributed.reshard_after_forward is True  # the default, under which FSDP2 crashed at step 1
    run(cfg)
    run(compose(*job, "run_name=plain"))
    return metric_rows(tmp_path / "sharded" / "pretrain"), metric_rows(tmp_path / "plain" / "pretrain")


# the LLM trained whole: the captions' gradient reaches the token embeddings through the sharded root, and VLAP's
# prototypes must follow the table as it trains (a frozen one is gathered once)
TRAINED_LLM = ("stages.pretrain.parts.llm=full", "stages.pretrain.lr.llm=1e-3")


@pytest.mark.parametrize(
    ("objective", "extra"),
    [("contrastive", TRAINED_LLM), ("vlap", ()), ("vlap", TRAINED_LLM)],
    ids=["contrastive_trained_llm", "vlap_frozen_llm", "vlap_trained_llm"],
)
def test_global_objectives_train_under_fsdp2_as_on_one_process(colour_set, tmp_path, objective, extra):
    """Both called the embedding table again after the forward, where FSDP2 had resharded it: "aten.embedding got
    mixed torch.Tensor and DTensor" at step 1 (VLAP would then have scored against a DTensor shard)."""
    ours, theirs = sharded_and_plain(colour_set, tmp_path, objective, "launcher=fsdp2", extra=extra)
    assert len(ours) == 2 and ours[0][f"loss/{objective}"] > 0
    for key in ("loss/total", f"loss/{objective}"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-5), key


@pytest.mark.parametrize("extra", [(), TRAINED_LLM], ids=["frozen_llm", "trained_llm"])
def test_vlap_trains_under_zero3_with_a_partitioned_embedding_table(colour_set, tmp_path, extra):
    """VLAP read the table's weight directly: under ZeRO-3 an empty placeholder outside the forward, so step 1 failed
    with "the LLM has 0 embedding rows". A persistence threshold of 0 partitions every parameter, the table too (by
    default DeepSpeed keeps whole any of under 100k elements)."""
    pytest.importorskip("deepspeed")
    partition = tmp_path / "partition_all.json"
    partition.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    ours, theirs = sharded_and_plain(
        colour_set, tmp_path, "vlap", "launcher=zero3", f"distributed.deepspeed_config={partition}", extra=extra
    )
    for key in ("loss/total", "loss/vlap"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-5), key


def old_lookup(monkeypatch, model, batch) -> None:
    """The captions' embeddings as the code before read them: a second lookup in the table, after the forward."""
    monkeypatch.setattr(
        pairs, "caption_token_embeddings", lambda out: model.llm.get_input_embeddings()(batch["input_ids"])
    )


@pytest.mark.parametrize("objective", ["contrastive", "vlap"])
def test_one_process_gives_the_second_lookups_loss_and_table_gradient(tiny_model, monkeypatch, objective):
    """The objective's loss, and its gradient on the token-embedding table and the connector, are those of the
    second lookup they replace, number for number (the caption side is the same lookup, now the forward's own)."""
    model = tiny_model()
    table = model.llm.get_input_embeddings().weight
    table.requires_grad_(True)
    batch = make_batch(model, [1, 2, 0, 1])
    if objective == "vlap":
        obj = VLAPObjective()
        obj.set_prior(torch.arange(table.shape[0]) % 7)
    else:
        obj = ContrastiveObjective()

    def loss_and_grads() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = obj(batch, model(batch), model).loss
        loss.backward()
        return loss.detach(), table.grad.clone(), [p.grad.clone() for p in model.connector.parameters()]

    loss, grad, connector = loss_and_grads()
    with monkeypatch.context() as m:
        old_lookup(m, model, batch)
        old_loss, old_grad, old_connector = loss_and_grads()
    assert grad.abs().sum() > 0  # the captions train the table
    assert loss.item() == old_loss.item()
    torch.testing.assert_close(grad, old_grad, rtol=0, atol=0)
    for new, old in zip(connector, old_connector, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0)


def test_pairs_without_the_forwards_embeddings_say_what_is_missing(tiny_model):
    model = tiny_model()
    batch = make_batch(model, [1, 1])
    out = model(batch)
    out.inputs_embeds = None
    with pytest.raises(ValueError, match=r"token embeddings from the model's output \(inputs_embeds.*AlignOutput"):
        pairs.image_caption_pairs(batch, out, model)
