"""Packed rows and the chunked LM loss: the fast default paths compute exactly what the plain ones do.

Packing: every sample's loss and every gradient equal those of the sample alone, unpadded (fp32, 1e-5), whichever
row it lands in and whatever precedes it there, sliding-window layers attending within their window. The chunked linear
cross-entropy equals the plain one, head transforms (scale, soft-cap) and frozen heads included.
"""

from __future__ import annotations

import functools
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F

from alignlm.constants import IGNORE_INDEX
from alignlm.data.build import build_dataset
from alignlm.data.collate import Collator, pack_rows
from alignlm.models.lm_loss import HeadTransform, linear_cross_entropy, linear_token_nll, linear_weight
from alignlm.models.mllm import AlignLM, attention_windows
from tests.conftest import small_llm_shape


def collator(model, **kw) -> Collator:
    return Collator(
        model.tokenizer.pad_token_id, image_token_id=model.image_token_id, num_image_tokens=model.num_image_tokens, **kw
    )


def test_pack_rows_is_first_fit_in_order():
    assert pack_rows([5, 4, 3, 6, 2], capacity=8) == [[0, 2], [1, 4], [3]]
    assert pack_rows([9, 1], capacity=8) == [[0], [1]]  # too long for a row: a row of its own
    assert pack_rows([], capacity=8) == []


@pytest.fixture
def samples(tiny_model, colour_set):
    model = tiny_model()
    data = {
        "sources": [{"path": str(colour_set["instruct"])}, {"path": str(colour_set["pretrain"])}],
        "template": "vicuna_v1",
    }
    ds = build_dataset(data, model, seed=0)
    picked = [ds[i] for i in (0, 50, 3, 60, 7)]  # two-turn QA and captions: different lengths
    assert len({len(s["input_ids"]) for s in picked}) > 1
    return model, picked


def test_packed_batch_layout(samples):
    model, picked = samples
    cap = 2 * max(len(s["input_ids"]) for s in picked)
    batch = collator(model, pack_length=cap)(picked)
    rows = batch["input_ids"].shape[0]
    assert rows < len(picked) and batch["num_samples"] == len(picked)
    for r in range(rows):  # position ids restart at 0 for every sample, and for the padding tail
        pos, sid = batch["position_ids"][r], batch["sample_ids"][r]
        starts = torch.nonzero(pos == 0).flatten().tolist()
        assert starts[0] == 0 and all(sid[s] != sid[s - 1] for s in starts[1:])
    for k in range(batch["num_samples"]):  # and count up from it: flash and flex attention find samples by them
        pos = batch["position_ids"][batch["sample_ids"] == k]
        assert torch.equal(pos, torch.arange(len(pos))), k
    by_id = {s["id"]: s for s in picked}
    for k, sid in enumerate(batch["ids"]):  # each sample's tokens, contiguous, in the order of batch["ids"]
        assert torch.equal(batch["input_ids"][batch["sample_ids"] == k], by_id[sid]["input_ids"])
    # images follow the order the samples are laid out in, and image_sample says whose they are
    expected = torch.cat([by_id[sid]["pixel_values"] for sid in batch["ids"]])
    assert torch.equal(batch["pixel_values"], expected)
    assert batch["image_sample"].tolist() == list(range(len(picked)))
    # no prediction crosses from one sample into the next
    flat = batch["sample_ids"].flatten()
    assert torch.equal(flat[batch["lm_positions"]], flat[batch["lm_positions"] + 1])


def per_sample_losses(model, batch) -> list[torch.Tensor]:
    """Summed LM loss of each sample of a batch, from the model's full logits."""
    out = model(batch, return_logits=True)
    index = model.index(batch)
    logits = out.logits.flatten(0, 1)[index["lm_positions"]].float()
    ce = F.cross_entropy(logits, index["lm_targets"], reduction="none")
    owner = index["sample_ids"].flatten()[index["lm_positions"]]
    return [ce[owner == k].sum() for k in range(index["num_samples"])], out


def summed_loss(model, batch) -> torch.Tensor:
    """The batch's summed LM loss with its graph (normalised by 1 instead of the supervised-token count)."""
    return model({**batch, "num_items_in_batch": torch.tensor(1.0)}).lm_loss


def test_packing_gives_each_samples_own_loss_and_gradients(samples):
    model, picked = samples
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    params = list(model.parameters())

    def grads_of(loss: torch.Tensor) -> list[torch.Tensor]:
        got = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params)]

    alone = {}  # every sample alone, unpadded
    for s in picked:
        loss = summed_loss(model, collator(model)([s]))
        alone[s["id"]] = (loss.detach(), grads_of(loss))
    packed = collator(model, pack_length=2 * max(len(s["input_ids"]) for s in picked))(picked)
    assert packed["input_ids"].shape[0] < len(picked)
    losses, _ = per_sample_losses(model, packed)
    for sid, loss in zip(packed["ids"], losses):
        torch.testing.assert_close(loss, alone[sid][0], rtol=1e-5, atol=1e-5)
    total = summed_loss(model, packed)
    torch.testing.assert_close(total.detach(), sum(a[0] for a in alone.values()), rtol=1e-5, atol=1e-5)
    summed = [sum(a[1][i] for a in alone.values()) for i in range(len(params))]
    for got, want in zip(grads_of(total), summed):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the padded layout agrees too
    torch.testing.assert_close(model(collator(model)(picked)).lm_loss_sum, total.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (1.0, 30.0), (0.125, None), (3.0, 30.0)])
@pytest.mark.parametrize("train_head", [True, False])
def test_chunked_cross_entropy_equals_the_plain_one(scale, softcap, train_head, per_token):
    """Summed (the LM loss) and per position (preference objectives weigh each sample's tokens by their own factor):
    values and gradients equal ``F.cross_entropy``'s, the per-position one under non-uniform weights, through the
    head's transform (a scale, as Granite's and Cohere's, then a soft-cap, as Gemma-2's)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = (torch.randn(50, 16, generator=g) * 3).requires_grad_(train_head)
    targets = torch.randint(0, 50, (37,), generator=g)
    weights = torch.randn(37, generator=g) if per_token else torch.full((), 2.5)
    logits = hidden @ weight.T * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reduction, chunked_loss = ("none", linear_token_nll) if per_token else ("sum", linear_cross_entropy)
    plain = F.cross_entropy(logits, targets, reduction=reduction)
    transform = HeadTransform(scale=scale, softcap=softcap)
    chunked = chunked_loss(hidden, weight, targets, transform, rows=8)  # five chunks, the last short
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    wrt = [hidden, weight] if train_head else [hidden]
    for a, b in zip(
        torch.autograd.grad((weights * chunked).sum(), wrt), torch.autograd.grad((weights * plain).sum(), wrt)
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sample_log_probabilities_and_the_lm_loss_share_one_pass_of_the_head(tiny_model):
    """A preference stage asks for each sample's log-probability: it and the LM loss come from one evaluation of the
    head on the supervised positions (the loss computed it a second time, with its gradients ahead, even where the
    stage trained no LM loss), equal to the plain log-softmax of the full logits."""
    from tests.conftest import make_batch

    model = tiny_model()
    batch = make_batch(model, [1, 0, 2])
    out = model(batch, return_logits=True, sample_logps=True)
    logps = torch.log_softmax(out.logits[:, :-1].float(), -1)
    shift = batch["labels"][:, 1:]
    token = logps.gather(2, shift.clamp(min=0)[..., None]).squeeze(2) * (shift != IGNORE_INDEX)
    torch.testing.assert_close(out.sample_logps, token.sum(1), rtol=1e-5, atol=1e-5)  # one sample per row here
    torch.testing.assert_close(out.lm_loss_sum, -token.sum(), rtol=1e-5, atol=1e-5)
    head = model.llm.get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            model(batch, sample_logps=True)
    finally:
        handle.remove()
    assert not calls  # the chunked path reads the head's weight; it never runs the module on all positions
    n = int((shift != IGNORE_INDEX).sum())
    seen = []
    original = torch.Tensor.__matmul__

    def counting(a, b):
        if b.shape[0] == head.weight.shape[1] and b.shape[1] == head.weight.shape[0]:
            seen.append(a.shape[0])
        return original(a, b)

    torch.Tensor.__matmul__ = counting
    try:
        model(batch, sample_logps=True)
    finally:
        torch.Tensor.__matmul__ = original
    assert sum(seen) == n  # every supervised position through the head once


def test_the_lm_loss_divides_by_the_global_share_even_below_one_item_per_rank(tiny_model):
    """``num_items_in_batch`` is the global step's supervised tokens over the ranks: with fewer tokens than ranks (the
    other ranks ran empty stand-in batches) it is below 1, and the loss must still be sum / share (it was clamped to 1,
    so the gradient was P / items times too small), as one big batch would weigh it; 0 (no items anywhere) divides by 1."""
    from tests.conftest import make_batch

    model = tiny_model()
    batch = make_batch(model, [1, 0])
    for share, denom in ((0.5, 0.5), (0.0, 1.0), (3.0, 3.0)):
        out = model({**batch, "num_items_in_batch": torch.tensor(share)})
        torch.testing.assert_close(out.lm_loss, out.lm_loss_sum / denom)


def test_chunked_cross_entropy_does_no_gradient_work_where_autograd_records_nothing():
    """Under ``torch.no_grad`` (an evaluation or a judge on a loaded model) the head's weight still requires grad, and
    an autograd Function's ``needs_input_grad`` follows only that: the loss alone is computed there (one matmul per
    chunk, no ``[V, D]`` gradient buffer), the same number."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, tuple[int, ...] | None]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen.append((str(func), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
            return out

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    losses, ops = [], []
    for recording in (True, False):
        with torch.set_grad_enabled(recording), Ops() as seen:
            losses.append(linear_cross_entropy(hidden, weight, targets, rows=8))  # five chunks
        ops.append(seen.seen)
    matmuls = [sum(name == "aten.mm.default" for name, _ in seen) for seen in ops]
    assert matmuls == [15, 5]  # per chunk: the logits, then the hidden states' and the head's gradients
    assert not any(shape == tuple(weight.shape) for _, shape in ops[1])
    assert torch.equal(losses[1], losses[0].detach())


def test_model_loss_uses_only_supervised_positions(tiny_model):
    model = tiny_model()
    from tests.conftest import make_batch

    batch = make_batch(model, [1, 0, 2])
    out = model(batch, return_logits=True)
    shift = batch["labels"][:, 1:]
    plain = F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), shift.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    torch.testing.assert_close(out.lm_loss_sum, plain, rtol=1e-5, atol=1e-5)
    assert int(out.num_items) == int((shift != IGNORE_INDEX).sum())


# ---- sliding-window attention -----------------------------------------------------------------------------------------


def windowed_model(base, family: str, attention: str = "sdpa") -> AlignLM:
    """The tiny model's tower, connector and tokenizer around a random causal LM whose layers slide a window of 4
    tokens: every layer of a Mistral, the first of two of a Gemma-3 (layer types)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    size = small_llm_shape(base, sliding_window=4, attn_implementation=attention)
    torch.manual_seed(0)
    if family == "mistral":
        llm = MistralForCausalLM(MistralConfig(**size))
    else:
        config = Gemma3TextConfig(head_dim=16, layer_types=["sliding_attention", "full_attention"], **size)
        llm = Gemma3ForCausalLM(config)
    return AlignLM(base.vision, base.connector, llm, base.tokenizer).eval()


def text_samples(lengths: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for k, length in enumerate(lengths):
        ids = torch.randint(10, 200, (length,), generator=g)
        samples.append({"id": f"s{k}", "input_ids": ids, "labels": ids.clone(), "n_images": 0, "pixel_values": None})
    return samples


def own_loss(llm, samples: list[dict]) -> torch.Tensor:
    """The causal LM's own summed loss, each sample alone (transformers' masks, its sliding window included)."""
    total = torch.zeros(())
    for s in samples:
        logits = llm(input_ids=s["input_ids"][None]).logits[0, :-1].float()
        total += F.cross_entropy(logits, s["labels"][1:], reduction="sum")
    return total


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_layers_attend_within_their_window_padded_and_packed(tiny_model, family, attention):
    """transformers uses a mask given to the decoder in every layer, so the one block-diagonal mask let a sliding
    layer attend to the whole sample in training (its window in generation); each layer type now gets its own mask
    (a dict for a model with layer types), the window cut as transformers cuts it."""
    model = windowed_model(tiny_model(), family, attention)
    samples = text_samples([16, 12, 9])  # longer than the window of 4
    with torch.no_grad():
        expected = own_loss(model.llm, samples)
        for layout, batch in (
            ("padded", collator(model)(samples)),
            ("packed", collator(model, pack_length=32)(samples)),  # rows [16 + 12], [9]
        ):
            assert layout == "padded" or batch["input_ids"].shape[0] == 2
            torch.testing.assert_close(model(batch).lm_loss_sum, expected, rtol=1e-5, atol=1e-4, msg=layout)


def test_layer_types_without_a_mask_here_are_refused_beside_sliding_ones():
    from types import SimpleNamespace

    assert attention_windows(SimpleNamespace()) == {"full_attention": None}  # Llama
    assert attention_windows(SimpleNamespace(sliding_window=8)) == {"sliding_attention": 8}  # Mistral: every layer
    full = SimpleNamespace(sliding_window=8, layer_types=["full_attention"] * 2)  # Qwen2 without use_sliding_window
    assert attention_windows(full) == {"full_attention": None}
    hybrid = SimpleNamespace(sliding_window=8, layer_types=["sliding_attention", "linear_attention"])
    with pytest.raises(ValueError, match=r"model\.llm.*linear_attention"):
        attention_windows(hybrid)


# ---- the vision-feature cache ------------------------------------------------------------------------------------------


def test_packed_samples_are_isolated_by_their_position_ids_alone(samples, monkeypatch):
    """Under flex_attention (packed by default) alignlm passes no mask: transformers finds the samples of a row where
    the position ids restart. Emulated under SDPA with no mask: each packed sample's loss is its loss alone (RoPE's
    relative positions hid positions that counted on across a row from the masked tests)."""
    model, picked = samples
    model.eval()
    monkeypatch.setattr(type(model), "sample_mask", lambda self, ids, dtype: None)
    alone = {s["id"]: model({**collator(model)([s]), "num_items_in_batch": torch.tensor(1.0)}).lm_loss for s in picked}
    packed = collator(model, pack_length=2 * max(len(s["input_ids"]) for s in picked))(picked)
    assert packed["input_ids"].shape[0] < len(picked)  # rows hold several samples
    index = model.index(packed)
    logits = model(packed, return_logits=True).logits.flatten(0, 1)[index["lm_positions"]].float()
    nll = F.cross_entropy(logits, index["lm_targets"], reduction="none")
    owner = index["sample_ids"].flatten()[index["lm_positions"]]
    for k, sid in enumerate(packed["ids"]):
        assert nll[owner == k].sum().item() == pytest.approx(alone[sid].item(), abs=1e-4), sid


def test_a_head_that_runs_as_a_module_gives_the_chunked_heads_loss(samples):
    """A head that does more when called than its matmul (a bias, LoRA on lm_head, a class of its own) runs as a
    module on the supervised positions: its summed loss is the chunked path's (a mean there had divided the loss by
    the supervised tokens twice, unseen: the tiny model's head is a plain linear layer)."""
    model, picked = samples
    model.eval()
    batch = collator(model)(picked)
    with torch.no_grad():
        want = model(batch).lm_loss_sum
        head = model.llm.get_output_embeddings()
        head.forward = torch.nn.Linear.forward.__get__(head)  # a forward of its own: linear_weight() is None
        assert linear_weight(head) is None
        got = model(batch).lm_loss_sum
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_feature_cache_trains_exactly_like_live_features_under_bf16(colour_set, tmp_path):
    """Under bf16 the cached features equal the live ones, but the connector's tokens had come out 1 ulp apart: the
    live features were a slice of the tower's output (the class token dropped), the cached ones contiguous, and the
    bf16 matmul kernel sums in an order that follows the layout (the losses 6e-5 apart; exactly equal in fp32)."""
    from alignlm.pipeline import run
    from tests.conftest import compose, read_losses, tiny_overrides

    common = [*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=3"]
    common.append("mixed_precision=bf16")
    run(compose(*common, "run_name=live"))
    run(compose(*common, "run_name=cached", "stages.pretrain.data.feature_cache=true"))
    live, cached = (read_losses(tmp_path / r / "pretrain") for r in ("live", "cached"))
    if torch.cuda.is_available():  # the tower runs in other batch sizes for the cache (other kernels, last bits)
        assert cached == pytest.approx(live, rel=1e-2)
    else:
        assert cached == live


def test_feature_cache_trains_exactly_like_live_features_and_is_reused(colour_set, tmp_path, alignlm_log):
    from alignlm.pipeline import run
    from tests.conftest import compose, read_losses, tiny_overrides

    common = [*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=5"]
    run(compose(*common, "run_name=live"))
    run(compose(*common, "run_name=cached", "stages.pretrain.data.feature_cache=true"))
    # equal on a CPU; on a GPU the tower runs in other batch sizes for the cache (other kernels, last bits)
    rel = 1e-5 if torch.cuda.is_available() else 1e-6
    assert read_losses(tmp_path / "cached" / "pretrain") == pytest.approx(
        read_losses(tmp_path / "live" / "pretrain"), rel=rel
    )
    shards = sorted((tmp_path / "feature_cache").rglob("*.safetensors"))
    assert len(shards) == 1
    stamp = shards[0].stat().st_mtime_ns
    # a fill killed mid-shard two hours ago (its temporary is removed), one writing now, another file's (both kept)
    folder = shards[0].parent
    abandoned, writing, other = (
        folder / n for n in (".rank0_a.safetensors.tmp41", ".rank1_b.safetensors.tmp42", ".x.tmp4")
    )
    for f in (abandoned, writing, other):
        f.write_bytes(b"\0" * 100)
    hours_ago = time.time() - 7200
    for f in (abandoned, other):
        os.utime(f, (hours_ago, hours_ago))
    run(compose(*common, "run_name=again", "stages.pretrain.data.feature_cache=true"))  # same tower: nothing recomputed
    assert [p.stat().st_mtime_ns for p in (tmp_path / "feature_cache").rglob("*.safetensors")] == [stamp]
    assert not abandoned.exists() and writing.exists() and other.exists()
    assert "other caches" not in alignlm_log.text
    # another tower key (padded images, the pretraining crops): filled anew beside the first, which it no longer reads
    padded = ["stages.pretrain.data.feature_cache=true", "stages.pretrain.data.image_aspect_ratio=pad"]
    run(compose(*common, "run_name=padded", *padded))
    assert (
        f"so all 48 are computed into it; {tmp_path / 'feature_cache'} holds 1 other caches this stage does not read "
        f"(another tower or settings, or an older alignlm's key: delete any no longer wanted): {folder.name}"
    ) in alignlm_log.text
    with pytest.raises(
        ValueError, match=r"feature_cache=True caches a frozen tower.s features, but stages.pretrain.parts.vision=full"
    ):
        run(
            compose(
                *common,
                "run_name=trained",
                "stages.pretrain.data.feature_cache=true",
                "stages.pretrain.parts.vision=full",
            )
        )


def test_an_unreadable_image_is_skipped_or_raised_with_the_cache_as_without_it(tmp_path):
    """The cache leaves a broken image out: its sample is skipped and counted under data.on_error=skip (the stage
    died, naming the file only), raised naming the record under raise, as with live images."""
    from alignlm.data.records import DataError
    from alignlm.pipeline import run
    from tests.conftest import compose, tiny_overrides, write_colour_set

    colours = write_colour_set(tmp_path / "colours")
    (tmp_path / "colours" / "images" / "0.png").write_bytes(b"not a png")
    common = [*tiny_overrides(colours, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=12"]
    counts = {}
    for name, cache in (("live", "false"), ("cached", "true")):
        skip = [f"run_name={name}", f"stages.pretrain.data.feature_cache={cache}", "stages.pretrain.data.on_error=skip"]
        run(compose(*common, *skip))
        counts[name] = json.loads((tmp_path / name / "summary.json").read_text())["stages"]["pretrain"]["data"]
    left_out = {"left_out": 1, "counts": {"unreadable image": 1}, "examples": {"unreadable image": ["p0"]}}
    reasons = {name: c.pop("reasons") for name, c in counts.items()}  # the first reason per cause, naming the file
    assert counts == {"live": left_out, "cached": left_out}
    assert all(r["unreadable image"][0] == "p0" and "0.png" in r["unreadable image"][1] for r in reasons.values())
    with pytest.raises(DataError, match=r"record id=p0 in .*cannot read image .*0\.png"):
        run(
            compose(
                *common,
                "run_name=raise",
                "stages.pretrain.data.feature_cache=true",
                "stages.pretrain.data.on_error=raise",
            )
        )


def test_an_image_changed_in_place_is_computed_again_not_served_from_the_cache(tmp_path):
    """An image edited or regenerated at the same path (same size on disk, another modification time) gets its new
    features: the cached run trains as the live one on the new images (the old features were served silently)."""
    from PIL import Image
    from safetensors import safe_open

    from alignlm.pipeline import run
    from tests.conftest import compose, read_losses, tiny_overrides, write_colour_set

    colours = write_colour_set(tmp_path / "colours")
    common = [*tiny_overrides(colours, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=5"]
    cached = [*common, "stages.pretrain.data.feature_cache=true"]
    run(compose(*cached, "run_name=before"))
    edited = sorted((tmp_path / "colours" / "images").glob("*.png"))[::2]
    for path in edited:  # the data's owner regenerates half the images: other colours, same sizes
        with Image.open(path) as im:
            Image.new("RGB", im.size, (255 - im.getpixel((0, 0))[0], 128, 30)).save(path)
    run(compose(*cached, "run_name=after"))
    run(compose(*common, "run_name=live"))
    rel = 1e-5 if torch.cuda.is_available() else 1e-6
    assert read_losses(tmp_path / "after" / "pretrain") == pytest.approx(
        read_losses(tmp_path / "live" / "pretrain"), rel=rel
    )
    assert read_losses(tmp_path / "after" / "pretrain") != read_losses(tmp_path / "before" / "pretrain")
    shards = sorted((tmp_path / "feature_cache").rglob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    with safe_open(str(shards[-1]), "pt") as f:  # only the changed images were computed again
        assert sorted(json.loads(f.metadata()["ids"])) == sorted(str(p.resolve()) for p in edited)


def test_a_swap_of_two_weight_rows_is_another_tower(tiny_model):
    from alignlm.training.feature_cache import tower_fingerprint

    model = tiny_model()
    before = tower_fingerprint(model, {"name": "tiny"})
    weight = next(p for p in model.vision.parameters() if p.dim() == 2 and not torch.equal(p[0], p[1]))
    with torch.no_grad():
        weight[[0, 1]] = weight[[1, 0]]  # same sum and sum of squares, other features
    assert tower_fingerprint(model, {"name": "tiny"}) != before


def test_a_tower_copied_elsewhere_keeps_its_feature_cache_and_one_edited_in_place_does_not(tmp_path):
    """The cache key holds the tower's weights, not the folder they were read from: a cluster job that copies its
    tower to node-local disk at each requeue had computed (and stored: 660 GB at LLaVA's 558k images, CLIP-L/336)
    every feature again. An edit of the folder's config in place is another tower."""
    import shutil
    from types import SimpleNamespace

    from alignlm.models.vision import HFVisionTower
    from alignlm.training.feature_cache import tower_fingerprint

    shape = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    HFVisionTower(config={**shape, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}).model.save_pretrained(
        tmp_path / "shared" / "tower"
    )

    def fingerprint(folder):
        tower = HFVisionTower(name_or_path=str(folder))
        model = SimpleNamespace(vision=tower, image_spec=tower.image_spec)
        return tower_fingerprint(model, {"_target_": "HFVisionTower", "name_or_path": str(folder)})

    shutil.copytree(tmp_path / "shared" / "tower", tmp_path / "node_local" / "job7" / "tower")
    assert fingerprint(tmp_path / "shared" / "tower") == fingerprint(tmp_path / "node_local" / "job7" / "tower")
    config = tmp_path / "shared" / "tower" / "config.json"
    settings = json.loads(config.read_text())
    before = fingerprint(config.parent)
    config.write_text(json.dumps({**settings, "hidden_act": "gelu"}))  # quick_gelu before: other features
    assert fingerprint(config.parent) != before


def test_a_damaged_feature_cache_is_refused_when_opened_and_never_written_with_nan(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from alignlm.data.feature_cache import FeatureCache, file_stamp
    from alignlm.data.records import DataError

    with pytest.raises(DataError, match="not finite: not cached"):
        FeatureCache(tmp_path / "nan").write("a", ["x.png"], [(1, 2)], torch.tensor([[[0.0, float("nan")]]]))
    assert not (tmp_path / "nan").exists() or not list((tmp_path / "nan").iterdir())
    good = FeatureCache(tmp_path / "ok")
    good.write("a", ["x.png", "y.png"], [(1, 2), None], torch.zeros(2, 3, 4))
    assert FeatureCache(tmp_path / "ok").layout == ((3, 4), "F32")
    for name, tensors, ids, match in [
        (
            "rows",
            {"features": torch.zeros(2, 3, 4)},
            ["a", "b", "c"],
            "one image per row",
        ),  # once an IndexError mid-run
        ("ids", {"features": torch.zeros(1, 3, 4)}, "not json", "cannot be read"),
        ("tensor", {"other": torch.zeros(1, 3, 4)}, ["a"], "no 'features' tensor"),
        ("shape", {"features": torch.zeros(1, 5, 4)}, ["z"], r"holds \(5, 4\) F32 features per image"),
        ("dtype", {"features": torch.zeros(1, 3, 4, dtype=torch.int32)}, ["z"], "holds I32 features; a tower's"),
        (
            "stamps",
            {"features": torch.zeros(2, 3, 4)},
            ["a", "b"],
            r"stamps do not list one \(size, mtime_ns\) per row",
        ),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "0.safetensors").write_bytes((tmp_path / "ok" / "a.safetensors").read_bytes())
        meta = {
            "ids": ids if isinstance(ids, str) else json.dumps(ids),
            **({"stamps": "[[1, 2]]"} if name == "stamps" else {}),  # one stamp for two rows
        }
        save_file(tensors, str(folder / "1.safetensors"), metadata=meta)
        with pytest.raises(DataError, match=match):
            FeatureCache(folder)
    # a shard rewritten with NaN after it was written: its rows had made every step non-finite, naming no shard
    image = tmp_path / "z.png"
    image.write_bytes(b"z")
    folder = tmp_path / "rewritten"
    FeatureCache(folder).write("a", [image], [file_stamp(image)], torch.zeros(1, 3, 4))
    with safe_open(str(folder / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file({"features": torch.full((1, 3, 4), float("nan"))}, str(folder / "a.safetensors"), metadata=meta)
    with pytest.raises(DataError, match=r"z.png: its cached features in .*a.safetensors are not finite") as e:
        FeatureCache(folder).get([image])
    assert e.value.cause == "unreadable image"


# ---- checkpointing per part, compilation ------------------------------------------------------------------------------


def test_checkpointing_per_part_changes_no_number(colour_set, tmp_path):
    from alignlm.pipeline import run
    from tests.conftest import compose, read_losses, tiny_overrides

    common = [
        *tiny_overrides(colour_set, tmp_path),
        "run=[pretrain]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=3",
        "stages.pretrain.parts.vision=full",
    ]
    run(compose(*common, "run_name=plain"))
    run(compose(*common, "run_name=ckpt", "stages.pretrain.gradient_checkpointing=[llm,vision]"))
    assert read_losses(tmp_path / "ckpt" / "pretrain") == pytest.approx(
        read_losses(tmp_path / "plain" / "pretrain"), rel=1e-5
    )
    with pytest.raises(ValueError, match="checkpointing applies to llm and vision, not \\['connector'\\]"):
        run(compose(*common, "run_name=bad", "stages.pretrain.gradient_checkpointing=[connector]"))


def note_size(sizes: list[int], tensor: torch.Tensor) -> torch.Tensor:
    """A saved-tensors hook: count what autograd keeps for the backward."""
    sizes.append(tensor.numel())
    return tensor


@pytest.mark.parametrize("llm", ["frozen", "full"])
def test_checkpointing_saves_activations_with_the_llm_frozen_too(tiny_model, llm):
    """Stage 1 (LLaVA's pretrain) freezes the LLM, yet the connector's gradient flows through it: checkpointing must
    drop its layers' activations there as well (transformers checkpoints only layers in training mode, and frozen parts
    were put in eval mode, so ``gradient_checkpointing: true`` kept every activation); the numbers stay the same."""
    from alignlm.training.stages import apply_stage
    from alignlm.training.trainer import enable_checkpointing
    from tests.conftest import make_batch

    saved, losses, grads = [], [], []
    for checkpointing in (False, True):
        model = tiny_model()
        apply_stage(model, {"vision": "frozen", "connector": "full", "llm": llm}, None)
        enable_checkpointing(model, checkpointing)
        model.train()
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(note_size, sizes), lambda t: t):
            out = model(make_batch(model, [1, 1, 0], text_len=8))
        out.lm_loss.backward()
        saved.append(sum(sizes))
        losses.append(out.lm_loss.detach())
        grads.append(next(model.connector.parameters()).grad)
        if llm == "frozen":  # no dropout below the checkpointed layer of a frozen part
            assert not model.llm.get_decoder().layers[0].mlp.training
    assert saved[1] < saved[0] / 2
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_compiled_llm_layers_train_like_eager_ones(tiny_model, colour_set, tmp_path):
    """``stage.compile``: every decoder layer goes through ``torch.compile`` (inductor, dynamic shapes), and packed
    finetuning rows of varying length train to the eager run's losses, with deterministic kernels on."""
    from torch._dynamo.utils import counters

    from alignlm.pipeline import run
    from alignlm.training.trainer import compile_llm_layers
    from tests.conftest import compose, read_losses, tiny_overrides, without_dispatch_modes

    model = tiny_model()
    compile_llm_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in model.llm.get_decoder().layers)
    common = [*tiny_overrides(colour_set, tmp_path), "run=[finetune]", "stages.finetune.init_from=null"]
    common += ["eval.sets=[]", "stages.finetune.max_steps=3", "stages.finetune.data.packing=true"]
    run(compose(*common, "run_name=eager"))
    for name, extra in (("compiled", []), ("checkpointed", ["stages.finetune.gradient_checkpointing=true"])):
        counters.clear()  # checkpointed: every layer broke the graph on a hub-kernel context variable, none compiled
        # transformers 5.17 checkpoints in GradientCheckpointingLayer.__call__ (5.25: in forward), outside the compiled
        # forward: the checkpointed run's layers were the compiled run's graphs, served from the cache, counting none
        torch._dynamo.reset()
        with without_dispatch_modes():
            run(compose(*common, f"run_name={name}", "stages.finetune.compile=true", *extra))
        assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"], name  # compiled, whole layers
        assert read_losses(tmp_path / name / "finetune") == pytest.approx(
            read_losses(tmp_path / "eager" / "finetune"), rel=1e-5
        )


def test_packing_auto_packs_only_where_attention_isolates_samples_for_free(colour_set, tmp_path):
    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer
    from tests.conftest import compose, tiny_overrides

    def collator(*extra: str):
        cfg = compose(*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", *extra)
        trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
        trainer.model = trainer.setup_model()
        return trainer.collator()

    assert collator().pack_length is None  # sdpa: a packed row would cost attention over the whole row
    assert collator("stages.pretrain.data.packing=true").pack_length == 2048
    assert collator("model.llm.attn_implementation=flex_attention").pack_length == 2048


def test_a_pack_length_that_nothing_reads_is_warned_about(colour_set, tmp_path, alignlm_log):
    """Set while batches stay padded (packing auto under SDPA), it had been accepted without a word."""
    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer
    from tests.conftest import compose, tiny_overrides

    for packing, warned in (("auto", True), ("true", False)):
        extra = [f"stages.pretrain.data.packing={packing}", "stages.pretrain.data.pack_length=64"]
        cfg = compose(*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", *extra)
        trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
        trainer.model = trainer.setup_model()
        alignlm_log.clear()
        trainer.collator()
        said = "stage pretrain: data.pack_length=64 is unused: batches are padded, not packed (data.packing=auto"
        assert (said in alignlm_log.text) is warned


@pytest.fixture
def fake_flash(monkeypatch):
    """transformers' flash-attention path on the CPU, with kernels made of SDPA: which kernel runs, whether packed
    samples stay apart, and what reads the device (outside the fake kernels, which read their lengths themselves)."""
    import inspect

    from torch.utils._python_dispatch import TorchDispatchMode

    fa = pytest.importorskip("transformers.modeling_flash_attention_utils")
    if (
        not hasattr(fa, "lazy_import_flash_attention")
        or "cu_seq_lens_q" not in inspect.signature(fa._flash_attention_forward).parameters
    ):
        pytest.skip("this transformers' flash-attention internals are not the ones faked here")
    seen: dict[str, list] = {"kernels": [], "reads": [], "windows": []}
    inside = [False]

    def attend(q, k, v, causal, scale, window=(-1, -1)):  # [B, T, H, D]; window: flash's (left, right), -1 none
        position = torch.arange(q.shape[1])
        back = position[:, None] - position[None, :]
        seen = (back >= 0) if causal else torch.ones_like(back, dtype=torch.bool)
        if window[0] >= 0:
            seen &= back <= window[0]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=seen, scale=scale, enable_gqa=True
        )
        return out.transpose(1, 2)

    def dense(q, k, v, softmax_scale=None, causal=True, window_size=(-1, -1), **_):
        seen["kernels"].append("dense")
        return attend(q, k, v, causal, softmax_scale, window_size)

    def varlen(
        q, k, v, cu_seqlens_q=None, max_seqlen_q=None, softmax_scale=None, causal=True, window_size=(-1, -1), **_
    ):
        seen["kernels"].append(f"varlen max_seqlen {type(max_seqlen_q).__name__}")
        seen["windows"].append(window_size)
        inside[0] = True
        cu = cu_seqlens_q.tolist()
        inside[0] = False
        runs = [
            attend(q[a:b][None], k[a:b][None], v[a:b][None], causal, softmax_scale, window_size)[0]
            for a, b in zip(cu, cu[1:])
        ]
        return torch.cat(runs)

    def kwargs(**kw):  # transformers' own conversion of a layer's sliding window to flash's (left, right) window
        window = kw.get("sliding_window")
        slide = {"window_size": (window - 1, window - 1)} if window is not None and kw["key_length"] > window else {}
        return {"softmax_scale": kw.get("softmax_scale"), "causal": kw.get("is_causal", True), **slide, **{
            k: kw[k] for k in ("max_seqlen_q",) if k in kw
        }}  # fmt: skip

    # transformers >= 5.19 returns a (flash, kv-cache) pair of kwargs builders, earlier ones the flash builder alone
    builders = (kwargs, dict) if hasattr(fa, "_process_with_kvcache_kwargs_fn") else kwargs
    monkeypatch.setattr(
        fa,
        "lazy_import_flash_attention",
        lambda *a, **k: ((dense, varlen, None, fa._pad_input, fa._unpad_input), builders),
    )

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and str(func) in ("aten._local_scalar_dense.default", "aten.nonzero.default"):
                seen["reads"].append(str(func))
            return func(*args, **(kwargs or {}))

    seen["mode"] = Reads
    return seen


def test_flash_attention_keeps_packed_and_padded_samples_apart_without_reading_the_device(samples, fake_flash):
    """transformers takes packed samples from the position ids only for one row; with several it ran plain causal
    attention over each row, so samples attended to the ones packed before them. The collator's run boundaries go
    to the kernel as cu_seq_lens (its max length a Python int), for packed and padded batches alike."""
    model, picked = samples
    model.eval()
    with torch.no_grad():
        reference, _ = per_sample_losses(model, collator(model)(picked))  # SDPA, one sample per row
        model.llm.config._attn_implementation = "flash_attention_2"
        try:
            cap = 2 * max(len(s["input_ids"]) for s in picked)
            for name, batch in (
                ("packed", collator(model, pack_length=cap)(picked)),
                ("padded", collator(model)(picked)),
            ):
                fake_flash["kernels"].clear()
                fake_flash["reads"].clear()
                with fake_flash["mode"]():
                    out = model(batch)
                losses, _ = per_sample_losses(model, batch)
                order = {sid: k for k, sid in enumerate(collator(model)(picked)["ids"])}
                for sid, loss in zip(batch["ids"], losses):
                    torch.testing.assert_close(loss, reference[order[sid]], rtol=1e-5, atol=1e-5, msg=name)
                assert set(fake_flash["kernels"]) == {"varlen max_seqlen int"}, name
                # none in alignlm; transformers' own mask preparation (create_causal_mask) reads the position ids once
                # per forward to look for packed rows, whatever the model passes
                assert len(fake_flash["reads"]) <= 1, (name, fake_flash["reads"])
                assert torch.isfinite(out.lm_loss_sum)
        finally:
            model.llm.config._attn_implementation = "sdpa"


def test_flash_attention_slides_each_layers_window_within_each_sample(tiny_model, fake_flash):
    """On the varlen path transformers hands the kernel each layer's sliding window with the collator's runs, so a
    Mistral's packed and padded samples attend within their window there too, as the model alone does."""
    model = windowed_model(tiny_model(), "mistral")
    samples = text_samples([16, 12, 9])
    with torch.no_grad():
        expected = own_loss(model.llm, samples)
        model.llm.config._attn_implementation = "flash_attention_2"
        for layout, batch in (
            ("padded", collator(model)(samples)),
            ("packed", collator(model, pack_length=32)(samples)),
        ):
            fake_flash["windows"].clear()
            torch.testing.assert_close(model(batch).lm_loss_sum, expected, rtol=1e-5, atol=1e-4, msg=layout)
            assert set(fake_flash["windows"]) == {(3, 3)}, layout
