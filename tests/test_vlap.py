"""VLAP: Sinkhorn assignments (rows exact, columns toward mu, no gradient, stable at 150k words), swap-symmetric loss,
word prior counted from the captions, and a tiny +exp=vlap training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alignlm.geometry.sinkhorn import sinkhorn
from alignlm.objectives.vlap import VLAPObjective, log_word_prior, token_counts, vlap_loss
from alignlm.pipeline import run
from tests.conftest import DeviceWaits, compose, tiny_overrides


def textbook_sinkhorn(scores: torch.Tensor, log_mu: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The definition, in float64: alternate column and row normalisation of exp(scores / epsilon) in log space."""
    log_q = scores.double() / epsilon
    log_cols = log_mu.double() + math.log(scores.shape[0])
    for _ in range(iterations):
        log_q = log_q - (torch.logsumexp(log_q, 0, keepdim=True) - log_cols)
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)
    return log_q.exp()


def cosine_scores(b: int, v: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1) @ F.normalize(torch.randn(v, d, generator=g), dim=-1).T


def random_log_mu(v: int, seed: int = 1) -> torch.Tensor:
    return torch.log_softmax(torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 2, 0)


@pytest.mark.parametrize("iterations", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rows_of_q_sum_to_one(iterations, dtype):
    q = sinkhorn(cosine_scores(32, 500).to(dtype), random_log_mu(500), epsilon=0.01, iterations=iterations)
    assert q.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1).double(), torch.ones(32, dtype=torch.float64), atol=2e-6, rtol=0)


def test_column_marginals_approach_mu_with_more_iterations():
    log_mu = random_log_mu(300)
    scores = cosine_scores(64, 300)
    errors = [
        (sinkhorn(scores, log_mu, epsilon=0.05, iterations=n).sum(0) / 64 - log_mu.exp()).abs().sum().item()
        for n in (1, 3, 10, 100)
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05 * errors[0]
    uniform = sinkhorn(scores, None, epsilon=0.05, iterations=300).sum(0) / 64
    torch.testing.assert_close(uniform, torch.full((300,), 1 / 300), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "scale,dtype,atol", [(1.0, torch.float32, 2e-5), (1e4, torch.float32, 2e-5), (1e6, torch.float64, 1e-9)]
)
def test_matches_the_textbook_log_domain_iteration(scale, dtype, atol):
    """Also where the fast path must fall back (a row dominated everywhere; exponents of 1e6 / epsilon, where
    float32 itself has no digits left, so that case runs in float64)."""
    scores = (cosine_scores(16, 2000) * scale).to(dtype)
    scores[0] -= 3 * scale
    log_mu = random_log_mu(2000)
    for n in (1, 3, 7):
        torch.testing.assert_close(
            sinkhorn(scores, log_mu, 0.01, n).double(), textbook_sinkhorn(scores, log_mu, 0.01, n), atol=atol, rtol=0
        )


def test_reads_nothing_back_from_the_device(monkeypatch):
    """On a GPU a host read waits for the device: Sinkhorn takes no branch on the data, also with extreme logits
    (a row far from every column, exponents of 1e6) and in float64. Any Python condition on a tensor, scalar read
    or data-sized op fails here."""

    def host_read(self, *args, **kwargs):
        raise AssertionError("sinkhorn read a tensor on the host")

    for name in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    extreme = cosine_scores(16, 300) * 1e4
    extreme[0] -= 3e4
    for scores in (cosine_scores(16, 300), extreme, extreme.double()):
        for n in (1, 3):
            with DeviceWaits() as waits:
                q = sinkhorn(scores, random_log_mu(300), 0.01, n)
            assert waits.seen == [] and q.shape == scores.shape


def test_finite_and_normalised_on_a_150k_vocabulary_with_extreme_logits():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 150_000, generator=g) * 1e4
    scores[1] = -3e4  # a row no column prefers
    scores[:, :1000] = 5e4  # columns every row prefers
    counts = torch.zeros(150_000, dtype=torch.long)
    counts[:50] = torch.randint(1, 10_000, (50,), generator=g)
    q = sinkhorn(scores, log_word_prior(counts).float())
    assert q.isfinite().all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(8), atol=1e-5, rtol=0)
    z = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    loss, _ = vlap_loss(
        z, z.flip(0), F.normalize(torch.randn(150_000, 16, generator=g), dim=-1), log_word_prior(counts).float()
    )
    assert loss.isfinite()


def test_q_carries_no_gradient_and_the_loss_gradient_flows_only_through_the_prediction():
    scores = cosine_scores(8, 100).requires_grad_()
    q = sinkhorn(scores)
    assert not q.requires_grad and q.grad_fn is None
    protos = F.normalize(torch.randn(100, 16), dim=-1)
    z_v = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_()
    z_t = F.normalize(torch.randn(8, 16), dim=-1)
    loss, _ = vlap_loss(z_v, z_t, protos, None)
    loss.backward()
    # the same loss with both assignments precomputed as constants gives the same gradient
    z = z_v.detach().clone().requires_grad_()
    q_v, q_t = sinkhorn(z.detach() @ protos.T), sinkhorn(z_t @ protos.T)
    manual = -0.5 * (
        (q_t * F.log_softmax(z @ protos.T / 0.01, -1)).sum(-1).mean()
        + (q_v * F.log_softmax(z_t @ protos.T / 0.01, -1)).sum(-1).mean()
    )
    manual.backward()
    torch.testing.assert_close(z_v.grad, z.grad)


def test_the_loss_is_float32_under_bf16_autocast():
    """The trainer computes objectives under autocast; divided by tau = epsilon = 0.01, bf16 cosines (spacing 2^-8 near
    1) would move every logit and Sinkhorn exponent by up to 0.4. Images and captions near words, as after training."""
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(2000, 64, generator=g), dim=-1)
    words = torch.randint(0, 2000, (8,), generator=g)
    z_v = F.normalize(protos[words] + 0.05 * torch.randn(8, 64, generator=g), dim=-1)
    z_t = F.normalize(protos[words] + 0.05 * torch.randn(8, 64, generator=g), dim=-1)

    def loss_and_grad(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        v = z_v.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = vlap_loss(v, z_t, protos, random_log_mu(2000))
        loss.backward()
        return loss.detach(), v.grad

    (want, want_grad), (got, got_grad) = loss_and_grad(False), loss_and_grad(True)
    assert got.dtype == torch.float32 and got.item() == want.item()
    torch.testing.assert_close(got_grad, want_grad, atol=0, rtol=0)


def test_loss_is_symmetric_when_v_and_t_are_swapped():
    protos = F.normalize(torch.randn(400, 16), dim=-1)
    z_v, z_t = F.normalize(torch.randn(12, 16), dim=-1), F.normalize(torch.randn(12, 16), dim=-1)
    log_mu = random_log_mu(400)
    a, _ = vlap_loss(z_v, z_t, protos, log_mu)
    b, _ = vlap_loss(z_t, z_v, protos, log_mu)
    torch.testing.assert_close(a, b)
    same, _ = vlap_loss(z_v, z_v, protos, log_mu)
    assert same < a  # identical representations predict each other best


def test_word_prior_is_counted_from_the_training_captions(colour_set, tiny_model):
    from alignlm.data.build import build_dataset

    model = tiny_model()
    data = {"sources": [{"path": str(colour_set["pretrain"]), "weight": 2.0}], "template": "plain"}
    dataset = build_dataset(data, model, seed=0)
    obj = VLAPObjective()
    obj.setup(model, dataset)
    vocab = model.llm.get_input_embeddings().num_embeddings
    captions = [f"A {c} square." for c in ("red", "green", "blue")] * 16 * 2  # 48 records, weight 2
    expected = token_counts(captions, model.tokenizer, vocab)
    assert expected.sum() > 0 and obj.log_mu.shape == (vocab,)
    torch.testing.assert_close(obj.log_mu, log_word_prior(expected).float())
    mu = obj.log_mu.double().exp()
    assert mu.sum().item() == pytest.approx(1.0)
    # softmax(log(count + 1) / 0.25): shares go as (count + 1) ** 4, so unseen words keep a tiny, equal, non-zero share
    seen, unseen = expected > 0, expected == 0
    assert mu[seen].min() > mu[unseen].max() and mu[unseen].min() > 0 and torch.allclose(mu[unseen], mu[unseen][0])
    i, j = torch.nonzero(seen).flatten()[:2]
    assert (mu[i] / mu[j]).item() == pytest.approx(((expected[i] + 1) / (expected[j] + 1)).item() ** 4, rel=1e-4)


def test_forward_without_setup_says_what_is_missing(tiny_model):
    from tests.conftest import make_batch

    model = tiny_model("model/connector=linear")
    batch = make_batch(model, [1, 1])
    with pytest.raises(RuntimeError, match="setup"):
        VLAPObjective()(batch, model(batch), model)


def test_pairs_images_with_their_own_captions_and_skips_text_only_samples(tiny_model):
    """Two images in sample 0, none in sample 1, one in sample 2: three pairs, one loss, gradient to the connector."""
    from tests.conftest import make_batch

    model = tiny_model("model/connector=linear")
    vocab = model.llm.get_input_embeddings().num_embeddings
    obj = VLAPObjective()
    obj.set_prior(torch.arange(vocab) % 7)
    batch = make_batch(model, [2, 0, 1])
    term = obj(batch, model(batch), model)
    term.loss.backward()
    assert term.loss.isfinite() and model.connector.proj.weight.grad.abs().sum() > 0
    # a batch with no image at all still gives a (zero) loss connected to the connector
    model.zero_grad()
    text_only = make_batch(model, [0, 0])
    term = obj(text_only, model(text_only), model)
    assert term.loss.item() == 0.0
    term.loss.backward()


def test_tiny_vlap_training_run(colour_set, tmp_path):
    cfg = compose(
        "+exp=vlap",
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
    assert cfg.model.connector._target_.endswith("LinearConnector")
    assert cfg.stages.pretrain.objectives.vlap.weight == 0.1 and cfg.stages.pretrain.objectives.lm.weight == 1.0
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss/vlap"]) and r["loss/vlap"] > 0 for r in rows)
    # total = lm + 0.1 * vlap
    assert rows[0]["loss/total"] == pytest.approx(rows[0]["loss/lm"] + 0.1 * rows[0]["loss/vlap"], rel=1e-4)


@pytest.mark.parametrize("objective", ["vlap", "contrastive"])
def test_an_objective_across_pairs_refuses_a_micro_batch_of_one(objective):
    """With one pair VLAP's transport plan is the prior whatever the scores, and contrast has no negative."""
    from alignlm.config import ConfigError
    from alignlm.training.trainer import build_objectives

    stage = {"per_device_batch_size": 1, "objectives": {objective: {"_target_": "x"}}}
    cls = {"vlap": VLAPObjective, "contrastive": "alignlm.objectives.contrastive.ContrastiveObjective"}[objective]
    target = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__name__}"
    stage["objectives"][objective] = {"_target_": target}
    with pytest.raises(ConfigError, match=f"{objective}.*per_device_batch_size >= 2"):
        build_objectives(stage)
    assert objective in build_objectives({**stage, "per_device_batch_size": 2})


def test_a_later_stage_with_a_contrastive_objective_and_one_sample_per_device_is_refused_before_any_trains():
    from alignlm.config import ConfigError

    cfg = compose(
        "+objective@stages.finetune.objectives.contrastive=contrastive", "stages.finetune.per_device_batch_size=1"
    )
    with pytest.raises(ConfigError, match="stages.finetune.objectives.contrastive needs per_device_batch_size >= 2"):
        run(cfg)


@pytest.mark.parametrize("fused", [False, True])
def test_a_trained_table_gives_this_steps_prototypes_whatever_the_optimizer(tiny_model, fused):
    """Fused AdamW (the default on CUDA) and DeepSpeed update the embedding table in place without moving its
    version: prototypes cached on the version stayed step 1's for a whole stage that trained the table (VLAP's loss
    at step 8 of a tiny finetune 23.6 fused against 30.9 unfused, and a resume recomputing them diverged)."""
    model = tiny_model("model/connector=linear")
    weight = model.llm.get_input_embeddings().weight
    weight.requires_grad_(True)
    obj = VLAPObjective()
    first = obj.prototypes(weight).detach().clone()
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=fused, foreach=False if fused else None)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    torch.testing.assert_close(obj.prototypes(weight), F.normalize(weight.detach().float(), dim=-1))
    assert not torch.equal(obj.prototypes(weight), first)
    weight.requires_grad_(False)  # a frozen table: computed once, kept while it is unchanged
    assert obj.prototypes(weight) is obj.prototypes(weight)


def test_the_word_prior_is_the_softmax_of_log_counts_over_the_temperature():
    """mu = softmax(log(count + 1) / T), by hand: counts 0, 1, 3 at T 0.25 give shares 1 : 16 : 256 (the test before
    compared the objective's prior with this same function)."""
    mu = log_word_prior(torch.tensor([0, 1, 3]), 0.25).exp()
    torch.testing.assert_close(mu, torch.tensor([1.0, 16.0, 256.0], dtype=torch.float64) / 273.0)
    flat = log_word_prior(torch.tensor([0, 1, 3]), 1.0).exp()  # T = 1: proportional to count + 1
    torch.testing.assert_close(flat, torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) / 7.0)


def test_the_word_prior_counts_only_the_records_an_epoch_draws_from_a_fractional_pool():
    """Of a pool (start, stop, take) only the first ``take`` positions stand for the epoch's share of its records."""
    from alignlm.objectives.vlap import caption_texts

    class Pooled:
        pools = [(2, 6, 1)]  # positions 2..5, one drawn an epoch: 3, 4 and 5 stand for nothing

        def __len__(self):
            return 7

        def record(self, i):
            return None, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": f"c{i}"}]}

    assert list(caption_texts(Pooled())) == ["c0", "c1", "c2", "c6"]
