"""Behaviours whose breakage no earlier test caught, found by mutation testing: each was changed on purpose (a
per-micro-batch objective summed over accumulation slots, a checkpoint unpickled with code, a sibling folder taken for
the image root, VLAP's word prior dropped, the chunked loss's softmax in bf16, CIDEr-D's clipping and BLEU's
per-reference clipping gone, norm weights and the temperature decayed, packed position ids continued across samples)
and the whole suite still passed. Each test below fails with its change applied; its docstring names the real bug it
guards against."""

from __future__ import annotations

import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from alignlm.data.collate import Collator
from alignlm.data.records import DataError, image_paths, outside_root, root_problem
from alignlm.evaluation.captions import bleu, cider_d
from alignlm.models.lm_loss import linear_cross_entropy, linear_token_nll
from alignlm.objectives.contrastive import ContrastiveObjective
from alignlm.objectives.vlap import log_word_prior, vlap_loss
from alignlm.training import checkpoint as ckpt
from alignlm.training.optim import build_optimizer
from alignlm.training.stages import apply_stage
from tests.conftest import compose, tiny_overrides
from tests.test_durable_writes import Parts, save_step
from tests.test_vlap import textbook_sinkhorn

# ---- 1. per-micro-batch objectives under gradient accumulation ------------------------------------------------------


@pytest.mark.parametrize(
    "extra, term",
    [
        (
            ["+objective@stages.pretrain.objectives.contrastive=contrastive", "stages.pretrain.lr.objectives=0"],
            "loss/contrastive",
        ),
        (["model/connector=moe"], "aux/moe_balance"),  # a connector's auxiliary losses: its logs were averaged, not it
    ],
    ids=["contrastive", "moe"],
)
def test_a_stage_accumulating_one_micro_batch_twice_steps_as_with_it_once(colour_set, tmp_path, extra, term):
    """With ``grad_accum`` N every objective that is a per-micro-batch mean (contrastive, VLAP, SEA, DPO, a connector's
    auxiliary loss) must be averaged over the step's micro-batches, as the LM loss is normalised by the step's
    supervised tokens: summed instead, it weighed N times more against the LM loss than with one micro-batch, and a
    run's balance of losses changed with its accumulation. The same micro-batch twice is exactly one big batch of it
    for both kinds of loss (a union of two different micro-batches is not, for a contrastive loss: its negatives
    change), so the logged losses, the gradient norm and every gradient equal those of one step on it alone."""
    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer

    cfg = compose(
        *tiny_overrides(colour_set, tmp_path, "run=[pretrain]"),
        *extra,
        "stages.pretrain.grad_accum=2",
        "stages.pretrain.lr.connector=0",  # the weights stay as they are: both steps see the same model
    )
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    trainer.setup()
    batch = trainer.collator()([trainer.dataset[i] for i in range(4)])
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    grads: list[list[torch.Tensor]] = []
    update = trainer.optimizer_step

    def recorded(finite, data):  # the gradients the optimizer is handed, before the update
        grads.append([p.grad.detach().clone() for p in params])
        return update(finite, data)

    trainer.optimizer_step = recorded
    logs = [trainer.step([batch, batch], 1), trainer.step([batch], 2)]
    (_, twice, *_), (_, once, *_) = trainer.fetch(logs)
    assert once[term] > 0.1  # the objective or the connector's loss contributes
    for key in ("loss/total", "loss/lm", term, "grad_norm"):
        assert twice[key] == pytest.approx(once[key], rel=1e-5), key
    assert any(g.abs().max() > 0 for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- 2. a resume unpickles no code ---------------------------------------------------------------------------------

MARKER = "alignlm-contract-marker"


class Hostile:
    """A pickle that, unpickled with ``weights_only=False``, runs code: it creates the file ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


@pytest.mark.parametrize("name", ["optimizer.pt", ckpt.zero_optimizer_file(0), "scheduler.pt", "rng_0.pt"])
def test_a_resume_runs_no_code_from_a_checkpoint_pickle(tmp_path, name):
    """Every ``.pt`` file a resume reads (the optimizer state, a ZeRO rank's partition of it, the LR schedule, the
    rank's RNG state) is loaded with ``torch.load(weights_only=True)``: a step checkpoint handed over or written by
    another user is data, and a crafted file (a ``__reduce__`` that calls ``exec``) would run its code at the resume
    of ``alignlm train`` with ``weights_only=False``. The load is refused, naming what it refused, and the code never
    runs."""
    path = save_step(tmp_path / "pretrain", 1)
    marker = tmp_path / MARKER
    torch.save(Hostile(str(marker)), path / name)
    model = Parts()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    try:
        ckpt.apply_training_state(ckpt.read_training_state(path, 0), model, optimizer, scheduler, rank=0)
        error = None
    except Exception as e:  # which error, and whether code ran first, are what is checked
        error = e
    assert not marker.exists(), f"unpickling {name} ran code"
    assert isinstance(error, pickle.UnpicklingError), f"{name} loaded, or failed otherwise: {error!r}"
    assert re.search(r"(?s)Weights only load failed.*\bexec\b", str(error))  # names the global it refused


# ---- 3. image paths stay under their root ---------------------------------------------------------------------------


def test_an_image_path_into_a_sibling_folder_sharing_the_roots_prefix_leaves_the_root(tmp_path):
    """``../img2/x.png`` under the root ``/data/img`` names ``/data/img2/x.png``: outside the root, though its text
    starts with the root's. A prefix test on the text (``startswith('/data/img')``) let a record read any folder
    whose name extends the root's; the check compares whole path components."""
    root, sibling = tmp_path / "img", tmp_path / "img2"
    root.mkdir()
    sibling.mkdir()
    (sibling / "x.png").write_bytes(b"")
    assert outside_root("../img2/x.png", str(root))
    assert outside_root("../img/../img2/x.png", str(root))
    assert not outside_root("../img/x.png", str(root)) and not outside_root("sub/../x.png", str(root))
    assert root_problem(["a.png", "../img2/x.png"], root) is not None
    with pytest.raises(DataError, match=r"image path '\.\./img2/x\.png' leaves image_root"):
        image_paths({"id": "r", "image": "../img2/x.png"}, root)
    assert image_paths({"id": "r", "image": "../img2/x.png"}, root, allow_outside_root=True) == [sibling / "x.png"]


# ---- 4. VLAP's word prior ------------------------------------------------------------------------------------------


def test_vlap_transports_toward_its_word_prior():
    """VLAP's Sinkhorn assignments have the word-frequency prior ``mu`` as column marginals: the loss is the
    definition's with that prior, and a skewed prior (five frequent words) gives another loss than a uniform one.
    Dropped, the prior was still counted at set-up and logged, and never used: every word equally likely."""
    g = torch.Generator().manual_seed(0)
    n, words, dim = 8, 50, 16
    z_v, z_t, prototypes = (F.normalize(torch.randn(k, dim, generator=g), dim=-1) for k in (n, n, words))
    counts = torch.zeros(words, dtype=torch.long)
    counts[:5] = 1000
    skewed = log_word_prior(counts).float()

    def definition(log_mu: torch.Tensor, tau: float = 0.01, epsilon: float = 0.01, iterations: int = 3):
        s_v, s_t = (z.double() @ prototypes.double().T for z in (z_v, z_t))
        q_v, q_t = (textbook_sinkhorn(s, log_mu, epsilon, iterations) for s in (s_v, s_t))
        log_p_v, log_p_t = F.log_softmax(s_v / tau, -1), F.log_softmax(s_t / tau, -1)
        return -0.5 * ((q_t * log_p_v).sum(-1).mean() + (q_v * log_p_t).sum(-1).mean())

    with_prior, _ = vlap_loss(z_v, z_t, prototypes, skewed)
    uniform, _ = vlap_loss(z_v, z_t, prototypes, None)
    assert with_prior.item() == pytest.approx(definition(skewed).item(), rel=1e-5)
    assert uniform.item() == pytest.approx(definition(torch.full((words,), -math.log(words))).item(), rel=1e-5)
    assert abs(with_prior.item() - uniform.item()) > 1.0


# ---- 5. the chunked loss's softmax in float32 under autocast --------------------------------------------------------


def test_the_chunked_cross_entropy_takes_its_softmax_in_float32_under_bf16_autocast():
    """Under bf16 autocast the head's matmul runs in bf16 and the softmax in float32, as
    ``F.cross_entropy(head(h).float(), ...)``: left in bf16, the log-sum-exp and the softmax (the gradient) keep 8
    bits, on every bf16 run (here the loss was off by 5e-5 relative and the hidden states' gradient by 0.14, where
    float32's are 1e-7 and exact)."""
    g = torch.Generator().manual_seed(0)
    n, dim, vocab = 64, 32, 1000
    hidden = torch.randn(n, dim, generator=g).requires_grad_()
    weight = torch.randn(vocab, dim, generator=g).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    logits = (hidden.bfloat16() @ weight.bfloat16().T).float()  # the reference: bf16 matmul, float32 softmax
    expected = F.cross_entropy(logits, targets, reduction="sum")
    want_h, want_w = torch.autograd.grad(expected, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, rows=16)
        nll = linear_token_nll(hidden, weight, targets, rows=16)
    assert loss.dtype == nll.dtype == torch.float32
    torch.testing.assert_close(loss, expected.detach(), rtol=5e-6, atol=0)
    torch.testing.assert_close(nll, F.cross_entropy(logits, targets, reduction="none").detach(), rtol=0, atol=1e-4)
    for got in (torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(nll.sum(), (hidden, weight))):
        torch.testing.assert_close(got[0], want_h, rtol=0, atol=1e-3)
        torch.testing.assert_close(got[1], want_w, rtol=2e-2, atol=3e-2)  # the reference's own bf16 rounding


# ---- 6, 7. caption scores -------------------------------------------------------------------------------------------


def test_cider_d_clips_a_repeated_word_to_its_reference_count():
    """CIDEr-D clips each hypothesis n-gram's tf-idf at the reference's (``min(v, r) * r``), so that repeating a
    word that is in the reference earns nothing; without the clip it is plain CIDEr, which such repetition games.

    By hand: two images, so every n-gram seen in one image's reference has idf log 2 (and an unseen one too, its
    document frequency taken as 1). "red red red square" against "red square": unigrams (3i, i) . (i, i) clipped to
    2 i^2 over norms sqrt(10) i and sqrt(2) i: 1/sqrt(5); bigrams ("red red" x2, "red square") . ("red square"): i^2
    over sqrt(5) i and i: 1/sqrt(5); no reference 3- or 4-grams. Length penalty exp(-2^2 / 72); score 10 x (2/sqrt(5))
    x penalty / 4 = sqrt(5) e^(-1/18). "blue circle" matches its reference: 10 x 2 / 4 = 5. Unclipped the unigram
    term is 2/sqrt(5) and the first image scores 1.5 x as much."""
    score = cider_d(["red red red square", "blue circle"], [["red square"], ["blue circle"]])
    assert score == pytest.approx((math.sqrt(5) * math.exp(-1 / 18) + 5) / 2, rel=1e-9)


def test_bleu_clips_each_ngram_by_its_count_in_one_reference_not_all_together():
    """BLEU's modified precision clips a hypothesis n-gram's count at its largest count in any one reference: "the"
    four times against two references holding one "the" each scores 1/4. Clipped by the references' summed counts,
    it scored 2/4, so more references made a repetitive caption score higher."""
    references = [["the cat sat down", "the dog ran off"]]
    assert bleu(["the the the the"], references, max_n=1) == pytest.approx(0.25)
    assert bleu(["the cat the cat"], references, max_n=1) == pytest.approx(0.5)  # 1 "the" + 1 "cat" of 4


# ---- 8, 9. weight decay ---------------------------------------------------------------------------------------------


def zero_gradient_step(optimizer: torch.optim.Optimizer) -> dict[torch.nn.Parameter, torch.Tensor]:
    """One AdamW step with every gradient zero: only weight decay moves a weight. The weights before it."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = {p: p.detach().clone() for p in params}
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return before


def test_weight_decay_leaves_every_norm_weight_and_bias_alone(tiny_model):
    """With ``weight_decay`` > 0 the matrices decay and no 1-D parameter does: norm weights (LayerNorm, RMSNorm),
    biases, CLIP's class embedding. Decayed, every norm weight was pulled toward 0 (a scale of 0 zeroes its layer's
    output) at every step of a run that sets weight decay."""
    model = tiny_model()
    apply_stage(model, {"vision": "full", "connector": "full", "llm": "full"})
    stage = {"lr": dict.fromkeys(("vision", "connector", "llm"), 1e-2), "weight_decay": 0.1, "warmup_ratio": 0.0}
    optimizer, _ = build_optimizer(model, stage, total_steps=10, fused=False)
    before = zero_gradient_step(optimizer)
    names = {p: n for n, p in model.named_parameters()}
    flat = [p for p in before if p.ndim < 2]
    assert any("norm" in names[p] for p in flat)  # the check covers norm weights
    assert [names[p] for p in flat if not torch.equal(p, before[p])] == []
    matrices = [p for p in before if p.ndim >= 2 and before[p].abs().max() > 0]
    assert matrices and [names[p] for p in matrices if torch.equal(p, before[p])] == []  # decay is on


def test_weight_decay_leaves_a_learnable_temperature_alone(tiny_model):
    """Objective parameters (the contrastive loss's learnable ``log(1 / temperature)``) train in a group of their
    own without weight decay, whatever the stage's: decayed, the temperature drifted toward 1 (log-scale 0) at every
    step, against what the loss asked of it."""
    model = tiny_model()
    apply_stage(model, {"vision": "frozen", "connector": "full", "llm": "frozen"})
    objective = ContrastiveObjective()
    stage = {"lr": {"connector": 1e-2, "objectives": 1e-2}, "weight_decay": 0.1, "warmup_ratio": 0.0}
    optimizer, _ = build_optimizer(model, stage, total_steps=10, objective_params=[objective.log_scale], fused=False)
    before = zero_gradient_step(optimizer)
    assert torch.equal(objective.log_scale, before[objective.log_scale])
    assert not torch.equal(model.connector.proj[0].weight, before[model.connector.proj[0].weight])  # decay is on


# ---- 10. packed position ids -----------------------------------------------------------------------------------------


def test_every_packed_sample_has_the_position_ids_it_has_alone():
    """A packed row's samples each get position ids ``0 .. length - 1``, as in a row of their own (the padding tail
    too). Continued across the row, a later sample's positions began where the earlier one's ended: hidden by RoPE
    under the block mask (relative positions), but another model for absolute position embeddings and for dynamic or
    LongRoPE scaling, which read the largest position id. (``test_packed_batch_layout`` checked only that every 0
    starts a sample, not that every sample starts at 0.)"""
    lengths = [5, 3, 7, 2, 4, 6]
    samples = [
        {
            "id": f"s{i}",
            "input_ids": torch.arange(10, 10 + k),
            "labels": torch.arange(10, 10 + k),
            "pixel_values": None,
            "n_images": 0,
        }
        for i, k in enumerate(lengths)
    ]
    batch = Collator(0, pack_length=12)(samples)
    assert batch["input_ids"].shape[0] < len(samples)  # really packed: rows hold several samples
    positions, owner = batch["position_ids"], batch["sample_ids"]
    for k, sid in enumerate(batch["ids"]):
        assert positions[owner == k].tolist() == list(range(lengths[int(sid[1:])])), sid
    tail = owner == -1
    for r in range(positions.shape[0]):
        assert positions[r][tail[r]].tolist() == list(range(int(tail[r].sum())))


def test_a_probe_image_damaged_during_training_skips_the_monitors_measurement_not_the_run(
    tiny_model, colour_set, tmp_path
):
    """The monitor reads its probe images at each measurement: one damaged after set-up raised out of the training
    step, though a diagnostic must not end the run. It is a warning and a skipped measurement."""
    import shutil

    from alignlm.training.monitor import AlignmentMonitor

    folder = tmp_path / "probe"
    shutil.copytree(colour_set["pretrain"].parent, folder)
    model = tiny_model()
    model.frozen_parts = ()  # a tower that trains: its features are computed at every measurement
    monitor = AlignmentMonitor(
        {"every": 1, "probe": str(folder / colour_set["pretrain"].name), "n": 8, "topk": 2}, model
    )
    assert monitor(1, model)
    (folder / "images" / "0.png").write_bytes(b"not a png")
    assert monitor(2, model) == {}


def test_an_objective_group_override_gets_no_advice_to_add_it_to_run():
    """The nearest-choice message for a group picked under a stage's objectives said "and add c to run", which a run
    then refused as a stage that is not configured: only a stage's own package is a stage."""
    from hydra.errors import HydraException

    from alignlm.checks import override_mistake
    from alignlm.config import compose

    for overrides, stage in ((["+exp=demo", "objective@stages.finetune.objectives.c=contrastive"], False),
                             (["+exp=demo", "stage=dpo"], True)):  # fmt: skip
        with pytest.raises(HydraException) as refused:
            compose(overrides)
        message = override_mistake(overrides, refused.value)
        assert ("to run" in message) is stage, message


def test_the_feature_cache_fill_decodes_with_the_stages_own_worker_count(tmp_path, monkeypatch):
    """The fill took ``auto`` workers whatever the stage's ``data.num_workers`` said: a stage that set 0 (a
    container's small /dev/shm) got up to 8 workers with 4 batches each in flight on a GPU node."""
    from types import SimpleNamespace

    from PIL import Image

    from alignlm.data.feature_cache import FeatureCache
    from alignlm.training import feature_cache as filling

    image, cache = tmp_path / "a.png", FeatureCache(tmp_path / "cache")
    Image.new("RGB", (8, 8)).save(image)
    survey, used = cache.survey([image]), []

    def shard(model, dataset, part, acc, workers):
        used.append(workers)
        return list(part), [(8, 8)], torch.zeros(1, 2, 3), torch.ones(1, dtype=torch.bool)

    monkeypatch.setattr(filling, "shard_features", shard)
    cuda = SimpleNamespace(process_index=0, device=torch.device("cuda"), num_processes=1)
    filling.fill(SimpleNamespace(vision=torch.nn.Identity()), None, cache, survey, [image], cuda, 0)
    assert used == [0]
