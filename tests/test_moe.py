"""MoE connector: balance and z losses, vectorised dispatch equal to a per-token reference, exact upcycling."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alignlm.models.connectors import MLPConnector, MoEConnector
from alignlm.models.connectors.moe import balance_loss, capacity_route, z_loss
from alignlm.models.io import load_final_weights, load_part_state, part_state
from alignlm.pipeline import run
from tests.conftest import compose, make_batch, tiny_overrides


def test_balance_is_one_for_uniform_routing_and_larger_when_skewed():
    probs = torch.full((12, 4), 0.25)
    assert balance_loss(probs, torch.arange(12) % 4).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(12, 1)
    assert balance_loss(skewed, torch.zeros(12, dtype=torch.long)).item() == pytest.approx(4 * 0.7)


def test_balance_is_each_images_averaged_over_the_images_as_cumo_computes_it():
    """Eight images, each sending all its tokens to one expert (two images an expert): pooled over the batch the
    shares are uniform and the loss is 1, its minimum, as if routing were balanced; per image, as CuMo computes it,
    it is E x the expert's probability. The connector's loss is the per-image one of its features' images."""
    from alignlm.models.connectors.moe import MoEConnector

    top1 = torch.arange(8).repeat_interleave(16) % 4
    probs = torch.full((128, 4), 0.01).scatter(1, top1[:, None], 0.97)
    assert balance_loss(probs, top1).item() == pytest.approx(1.0)
    assert balance_loss(probs, top1, groups=8).item() == pytest.approx(4 * 0.97)
    torch.manual_seed(0)
    moe = MoEConnector(8, 8, num_experts=4, top_k=2, balance_weight=1.0)
    features = torch.randn(3, 5, 8)
    _, expected_probs, _, _ = moe.route(features.reshape(15, 8))
    expected = balance_loss(expected_probs, expected_probs.argmax(-1), groups=3)
    torch.testing.assert_close(moe(features).aux_losses["moe_balance"], expected)
    assert not torch.allclose(expected, balance_loss(expected_probs, expected_probs.argmax(-1)))


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    want = (torch.log(torch.tensor(2.0)) ** 2 + torch.logsumexp(torch.tensor([1.0, 2.0]), 0) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(want.item())


def test_dispatch_matches_a_per_token_reference_and_weights_sum_to_one():
    torch.manual_seed(0)
    moe = MoEConnector(6, 5, num_experts=4, top_k=2)
    x = torch.randn(3, 7, 6)
    out = moe(x)
    flat = x.reshape(-1, 6)
    _, _, weights, experts = moe.route(flat)
    torch.testing.assert_close(weights.sum(-1), torch.ones(21))
    ref = torch.zeros(21, 5)
    for t in range(21):  # the naive definition: y = sum_k w_k * expert_k(x)
        for j in range(2):
            e = experts[t, j]
            h = F.gelu(flat[t] @ moe.w1[e] + moe.bias1[e])
            ref[t] += weights[t, j] * (h @ moe.w2[e] + moe.bias2[e])
    torch.testing.assert_close(out.tokens.reshape(-1, 5), ref, atol=1e-5, rtol=1e-5)
    load = torch.stack([out.metrics[f"expert_load/{e}"] for e in range(4)])
    assert load.sum().item() == pytest.approx(1.0)
    assert set(out.aux_losses) == {"moe_balance", "moe_z"}


def test_tokens_keep_the_features_precision_under_bf16_autocast():
    """float32 features (a trained tower) mix the experts' bf16 outputs in float32, as a sum over the chosen experts
    would; bf16 features (a frozen tower stored in bf16) give bf16 tokens."""
    torch.manual_seed(0)
    moe = MoEConnector(6, 5, num_experts=4, top_k=2)
    x = torch.randn(2, 7, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, half = moe(x).tokens, moe(x.bfloat16()).tokens
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
    torch.testing.assert_close(full, moe(x).tokens, atol=5e-2, rtol=5e-2)  # bf16 matmuls, float32 mixing


def test_the_router_computes_in_float32_under_bf16_autocast():
    """Switch Transformer's selective precision: the router's logits under bf16 autocast equal the float32 ones (its
    matmul ran in bf16: logits 8e-3 off, another top expert for some tokens), from bf16 features (a frozen tower
    stored in bf16) too, and a router stored in bf16 (a frozen connector) computes in its own dtype."""
    torch.manual_seed(0)
    moe = MoEConnector(64, 5, num_experts=8, top_k=2)
    x = torch.randn(4096, 64)
    want = moe.route(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = moe.route(x)[0]
        from_half = moe.route(x.bfloat16())[0]
    assert logits.dtype == torch.float32 and torch.equal(logits, want)
    torch.testing.assert_close(from_half, moe.route(x.bfloat16().float())[0], atol=0, rtol=0)
    moe.router.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.route(x)[0].dtype == torch.float32


def test_gradients_reach_router_and_experts():
    moe = MoEConnector(6, 5)
    out = moe(torch.randn(2, 4, 6))
    (out.tokens.pow(2).mean() + sum(out.aux_losses.values())).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_top1_routing_scales_by_the_router_probability_so_the_task_loss_trains_the_router():
    """With top_k 1 a renormalised weight is the constant 1, through which no task gradient reaches the router; the
    expert's output is scaled by its probability instead (Switch Transformer). The aux losses are off here."""
    torch.manual_seed(0)
    for capacity_factor in (None, 1.0):
        moe = MoEConnector(
            16, 8, num_experts=4, top_k=1, balance_weight=0.0, z_weight=0.0, capacity_factor=capacity_factor
        )
        x = torch.randn(2, 5, 16)
        _, probs, weights, experts = moe.route(x.reshape(-1, 16))
        torch.testing.assert_close(weights, probs.gather(1, experts))
        moe(x).tokens.pow(2).sum().backward()
        assert moe.router.weight.grad.norm() > 0.1, capacity_factor


def test_upcycled_moe_reproduces_the_dense_connector():
    torch.manual_seed(1)
    dense = MLPConnector(6, 5, depth=2)
    moe = MoEConnector(6, 5, num_experts=4, top_k=2)
    moe.load_state_dict(moe.adapt_state(dense.state_dict()))
    x = torch.randn(2, 9, 6)
    torch.testing.assert_close(moe(x).tokens, dense(x).tokens, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="only a dense mlp2x_gelu"):
        moe.adapt_state(MLPConnector(6, 5, depth=3).state_dict())


def test_bad_knobs_name_the_config():
    with pytest.raises(ValueError, match="top_k"):
        MoEConnector(6, 5, num_experts=2, top_k=3)


def test_router_trains_at_its_own_learning_rate_scale():
    """``router_lr_scale``: the router gets its own optimizer groups at scale x the connector lr; the rest keep it."""
    from alignlm.models.build import build_model
    from alignlm.training.optim import build_optimizer

    m = build_model(compose("model=tiny", "model/connector=moe", "model.connector.router_lr_scale=0.05").model)
    for p in m.parameters():
        p.requires_grad_(False)
    for p in m.connector.parameters():
        p.requires_grad_(True)
    opt, _ = build_optimizer(m, {"lr": {"connector": 2e-3}, "weight_decay": 0.1, "warmup_ratio": 0.0}, total_steps=10)
    by_name = {}
    for g in opt.param_groups:
        by_name.setdefault(g["name"], []).append(g)
    assert set(by_name) == {"connector", "connector.router"}
    router = by_name["connector.router"]
    assert [p is m.connector.router.weight for g in router for p in g["params"]] == [True]
    assert router[0]["lr"] == pytest.approx(1e-4) and router[0]["weight_decay"] == 0.1
    rest = [p for g in by_name["connector"] for p in g["params"]]
    assert len(rest) == 4 and all(g["lr"] == pytest.approx(2e-3) for g in by_name["connector"])
    assert {g["weight_decay"] for g in by_name["connector"]} == {0.1, 0.0}  # biases are never decayed
    with pytest.raises(ValueError, match="router_lr_scale"):
        MoEConnector(6, 5, router_lr_scale=0.0)


def test_moe_trains_in_the_pipeline_logs_expert_load_and_upcycles_a_dense_stage(colour_set, tmp_path):
    base = tiny_overrides(colour_set, tmp_path, "run=[pretrain]", "stages.pretrain.max_steps=2")
    run(compose(*base, "run_name=dense"))
    dense_final = tmp_path / "dense" / "pretrain" / "final"
    run(compose(*base, "run_name=moe", "model/connector=moe", f"stages.pretrain.init_from={dense_final}"))
    rows = [json.loads(r) for r in (tmp_path / "moe" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert {"aux/moe_balance", "aux/moe_z", "connector/expert_load/0"} <= set(rows[0])
    from alignlm.models.build import build_model

    dense_model, moe_model = build_model(compose(*base).model), build_model(compose(*base, "model/connector=moe").model)
    load_final_weights(dense_model, dense_final)
    load_final_weights(moe_model, dense_final)
    batch = make_batch(dense_model, [1, 2])
    with torch.no_grad():
        torch.testing.assert_close(moe_model(batch).lm_loss, dense_model(batch).lm_loss)


def test_text_only_batch_does_not_train_the_router():
    from alignlm.models.build import build_model

    model = build_model(compose("model/connector=moe").model)
    out = model(make_batch(model, [0, 0]))
    assert all(v.item() == 0 for v in out.aux_losses.values())
    load_part_state(model, part_state(model, ["connector"]), ["connector"])  # its own layout loads unchanged


def test_the_zero_image_of_a_text_only_micro_batch_is_not_logged_as_routing(colour_set, tmp_path):
    """A text-only micro-batch runs a zero image through the connector to keep ranks in step: its aux losses were
    zeroed but its expert loads were logged as data. The keys stay (every rank reduces the same table), the values are
    left out of the step's mean: null for a step without images, the image micro-batch's alone beside one."""
    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer
    from tests.test_training import text_only_records

    text = text_only_records(tmp_path / "text_only.json")
    cfg = compose(
        *tiny_overrides(
            colour_set, tmp_path, "run=[pretrain]", "model/connector=moe", "stages.pretrain.lr.connector=0"
        ),
        f"stages.pretrain.data.sources=[{{path:{colour_set['pretrain']}}},{{path:{text}}}]",
    )
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    trainer.setup()
    data, collate = trainer.dataset, trainer.collator()
    with_images = collate([data[i] for i in range(len(data)) if data[i]["n_images"]][:4])
    text_only = collate([data[i] for i in range(len(data)) if not data[i]["n_images"]][:4])
    micro = [[text_only], [with_images], [with_images, text_only]]
    logs = [trainer.step(m, step) for step, m in enumerate(micro, 1)]
    rows = {step: row for step, row, *_ in trainer.fetch(logs)}
    routing = [k for k in rows[2] if k.startswith("connector/")]
    assert "connector/expert_load/0" in routing and all(k in rows[1] and k in rows[3] for k in routing)
    assert all(rows[1][k] is None for k in routing)
    assert all(rows[3][k] == pytest.approx(rows[2][k]) for k in routing)


def _loads(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(experts.reshape(-1), minlength=num_experts)


def test_capacity_route_caps_every_expert_and_gives_each_token_k_distinct_experts():
    torch.manual_seed(0)
    skew = torch.tensor([4.0, 2.0, 0.0, -2.0])  # every token prefers expert 0, then 1
    probs = (torch.randn(128, 4) + skew).softmax(-1)
    capacity = math.ceil(1.1 * 128 * 2 / 4)
    experts = capacity_route(probs, 2, capacity)
    assert experts.shape == (128, 2) and (experts[:, 0] != experts[:, 1]).all()
    load = _loads(experts, 4)
    assert load.sum() == 256 and load.max() <= capacity
    share = load / 256  # the cap bounds the smallest share too: 1 - 3 * 1.1 / 4
    assert share.min() >= 1 - 3 * capacity / 256 and share.min() > 0.10
    assert _loads(probs.topk(2, -1).indices, 4)[3] < 10  # without the cap expert 3 would starve
    # the most confident tokens keep their first choice
    first = experts.eq(0).any(1)
    assert probs[first, 0].min() >= probs[~first, 0].max()


def test_capacity_route_changes_nothing_when_no_expert_is_over_its_cap():
    probs = torch.randn(40, 4).softmax(-1)
    torch.testing.assert_close(capacity_route(probs, 2, 80), probs.topk(2, -1).indices)


def test_capacity_route_fills_short_tokens_over_the_cap_rather_than_dropping_them():
    # capacity 3 for 4 tokens x top-2 over 3 experts: the least confident token is refused by experts 0 and 1,
    # gets expert 2, and must still get a second expert: its best one, over the cap
    probs = torch.tensor([[0.5, 0.4, 0.1]] * 3 + [[0.45, 0.35, 0.2]])
    experts = capacity_route(probs, 2, 3)
    assert (experts[:, 0] != experts[:, 1]).all()
    assert experts[3].tolist() == [0, 2] and _loads(experts, 3).tolist() == [4, 3, 1]


def test_moe_capacity_applies_in_training_only_by_default_and_logs_both_loads():
    torch.manual_seed(0)
    moe = MoEConnector(6, 5, num_experts=4, top_k=2, capacity_factor=1.1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 5.0  # a skewed router: feature 0 > 0 sends tokens to expert 0
    x = torch.randn(4, 32, 6).abs()
    out = moe(x)
    loads = torch.stack([out.metrics[f"expert_load/{e}"] for e in range(4)])
    assert loads.max() <= math.ceil(1.1 * 128 * 2 / 4) / 256 + 1e-6 and loads.min() > 0.10
    assert out.metrics["expert_pref/0"] > 0.45 and out.metrics["moe_rerouted"] > 0
    moe.eval()
    flat = x.reshape(-1, 6)
    _, probs, _, experts = moe.route(flat)
    torch.testing.assert_close(experts, probs.topk(2, -1).indices)  # eval_capacity_factor null: plain top-k
    assert "moe_rerouted" not in moe(x).metrics
    with pytest.raises(ValueError, match="capacity_factor must be >= 1"):
        MoEConnector(6, 5, capacity_factor=0.9)
