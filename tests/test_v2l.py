"""V2L connector: tokens are exactly the LLM's word embeddings, straight-through gradients, the codebook, the switch."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alignlm.data.images import PADDED
from alignlm.methods.v2l.connector import V2LConnector, word_ids
from alignlm.models.build import build_model
from alignlm.models.io import load_model
from alignlm.pipeline import run
from tests.conftest import compose, make_batch, tiny_overrides


@pytest.fixture
def v2l_model():
    return build_model(compose("model=tiny", "model/connector=v2l").model)


def test_every_visual_token_is_a_word_embedding_of_the_llm_and_decodes_to_it(v2l_model):
    conn, table = v2l_model.connector, v2l_model.llm.get_input_embeddings().weight
    features = torch.randn(3, v2l_model.vision.num_patches, v2l_model.vision.hidden_size)
    tokens = conn(features).tokens
    ids = conn.words(features)
    assert tokens.shape == (3, v2l_model.num_image_tokens, table.shape[1]) and ids.shape == tokens.shape[:2]
    assert v2l_model.num_image_tokens == conn.global_tokens + v2l_model.vision.num_patches
    torch.testing.assert_close(tokens, table[ids], rtol=0, atol=0)
    # the global words of one image are distinct, best first
    assert all(len(set(row[: conn.global_tokens].tolist())) == conn.global_tokens for row in ids)
    # a visual token never becomes a control token: no special id and not <image>
    special = set(v2l_model.tokenizer.all_special_ids) | {v2l_model.image_token_id}
    assert not special & set(ids.flatten().tolist())


def test_the_nearest_word_by_cosine_is_chosen(v2l_model):
    conn = v2l_model.connector
    features = torch.randn(2, v2l_model.vision.num_patches, v2l_model.vision.hidden_size)
    z = conn.proj(features)
    sim = F.normalize(z, dim=-1) @ F.normalize(conn.table, dim=-1).T
    assert torch.equal(conn.words(features)[:, conn.global_tokens :], conn.vocab_ids[sim.argmax(-1)])


def test_straight_through_gradient_is_that_of_the_encoder_output_rescaled_to_the_word_norm(v2l_model):
    conn = V2LConnector(
        8,
        v2l_model.connector.out_dim,
        global_tokens=0,
        commitment_weight=0,
        reconstruction_weight=0,
        diversity_weight=0,
    )
    conn.bind_vocabulary(v2l_model.llm.get_input_embeddings().weight.detach(), v2l_model.tokenizer)
    features, weight = torch.randn(2, 5, 8), torch.randn(2, 5, conn.out_dim)
    (conn(features).tokens * weight).sum().backward()
    got = {n: p.grad.clone() for n, p in conn.named_parameters()}
    conn.zero_grad()
    z = conn.proj(features)
    norms = conn.table[conn._search(z, 1).squeeze(-1)].norm(dim=-1, keepdim=True)
    ((F.normalize(z, dim=-1) * norms) * weight).sum().backward()
    for name, p in conn.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)
    assert not conn.table.requires_grad


def test_commitment_loss_pulls_the_encoder_towards_its_words(v2l_model):
    conn = v2l_model.connector
    torch.manual_seed(0)
    features = torch.randn(4, v2l_model.vision.num_patches, v2l_model.vision.hidden_size)
    opt = torch.optim.Adam(conn.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        out = conn(features)
        first = first if first is not None else out.metrics["v2l_commitment"].item()
        opt.zero_grad()
        out.aux_losses["v2l_commitment"].backward()  # this term alone
        opt.step()
    assert out.metrics["v2l_commitment"].item() < 0.5 * first
    assert 1 <= out.metrics["v2l_codes_used"].item() <= out.metrics["v2l_code_perplexity"].item() * 10


def test_codebooks_keep_words_or_every_non_special_entry(v2l_model):
    tok, rows = v2l_model.tokenizer, 512
    words, everything = word_ids(tok, rows, "words"), word_ids(tok, rows, "all")
    assert set(words) < set(everything) and not set(tok.all_special_ids) & set(everything)
    assert all(t[0] == " " and t[1:].isalpha() for t in tok.batch_decode([[i] for i in words]))
    assert max(everything) < rows
    with pytest.raises(ValueError, match="codebook"):
        word_ids(tok, rows, "bigrams")


def test_bad_knobs_and_token_norm_are_refused():
    with pytest.raises(ValueError, match="visual_token_norm must be null"):
        build_model(compose("model=tiny", "model/connector=v2l", "model.visual_token_norm=1.0").model)
    with pytest.raises(ValueError, match="global_tokens"):
        V2LConnector(8, 8, global_tokens=-1)
    with pytest.raises(ValueError, match="commitment_weight"):
        V2LConnector(8, 8, commitment_weight=-0.1)
    with pytest.raises(RuntimeError, match="no codebook"):
        V2LConnector(8, 8)(torch.randn(1, 2, 8))


def test_v2l_trains_with_a_frozen_llm_saves_no_codebook_and_reloads_the_same_words(colour_set, tmp_path):
    overrides = tiny_overrides(
        colour_set, tmp_path, "model/connector=v2l", "stages.finetune.parts.llm=frozen", "stages.finetune.lora=null"
    )
    run(compose(*overrides))
    rows = [json.loads(r) for r in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert {"aux/v2l_commitment", "connector/v2l_code_perplexity"} <= set(rows[0])
    final = tmp_path / "t" / "finetune" / "final"
    model = load_model(final)
    assert not any("table" in k or "vocab_ids" in k for k in model.connector.state_dict())
    fresh = build_model(compose(*overrides).model)
    table = fresh.llm.get_input_embeddings().weight
    torch.testing.assert_close(model.llm.get_input_embeddings().weight, table)  # the LLM stayed frozen
    batch = make_batch(model, [1, 1])
    features = model.vision(batch["pixel_values"])
    torch.testing.assert_close(model.connector(features).tokens, table[model.connector.words(features)])


def test_v2l_words_prints_the_words_of_a_checkpoint(colour_set, tmp_path, capsys):
    from alignlm.commands import main

    run(compose(*tiny_overrides(colour_set, tmp_path, "model/connector=v2l", "run=[pretrain]")))
    final, out = tmp_path / "t" / "pretrain" / "final", tmp_path / "words.json"
    assert (
        main(["v2l-words", str(final), "--data", str(colour_set["pretrain"]), "--limit", "2", "--json", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    model = load_model(final)
    assert len(report) == 2 and all(len(r["global"]) == model.connector.global_tokens for r in report.values())
    assert all(len(r["patches"]) == model.vision.num_patches - model.vision.num_prefix_tokens for r in report.values())
    assert "global:" in capsys.readouterr().out


def test_the_codebook_moves_with_the_module_but_is_no_buffer(v2l_model):
    conn = v2l_model.connector
    assert not dict(conn.named_buffers()) and "table" not in conn.state_dict()  # DDP broadcasts no codebook
    conn.to(torch.float64)
    assert conn.table.dtype == torch.float64 and conn.vocab_ids.dtype == torch.long
    features = torch.randn(1, v2l_model.vision.num_patches, v2l_model.vision.hidden_size, dtype=torch.float64)
    assert conn(features).tokens.dtype == torch.float64


def test_diversity_is_low_for_confident_tokens_spread_over_words_and_high_when_they_collapse(v2l_model):
    conn = v2l_model.connector
    n = 16
    spread = torch.full((n, len(conn.table)), -1.0)
    spread[torch.arange(n), torch.arange(n)] = 1.0  # each token sure of its own word
    collapsed = torch.full((n, len(conn.table)), -1.0)
    collapsed[:, 0] = 1.0  # every token sure of the same word
    assert conn._diversity(spread).item() == pytest.approx(-math.log(n), abs=1e-3)
    assert conn._diversity(collapsed).item() == pytest.approx(0.0, abs=1e-3)


def test_every_auxiliary_term_is_logged_with_its_weight(v2l_model):
    conn = v2l_model.connector
    out = conn(torch.randn(2, v2l_model.vision.num_patches, v2l_model.vision.hidden_size))
    assert set(out.aux_losses) == {"v2l_commitment", "v2l_reconstruction", "v2l_diversity"}
    for name, weight in (("commitment", 0.25), ("reconstruction", 1.0), ("diversity", 1.0)):
        torch.testing.assert_close(out.aux_losses[f"v2l_{name}"].detach(), weight * out.metrics[f"v2l_{name}"])
    with pytest.raises(ValueError, match="reconstruction_weight"):
        V2LConnector(8, 8, reconstruction_weight=-1)


def test_v2l_words_reads_images_in_batches_on_the_asked_device(colour_set, monkeypatch, capsys, tmp_path):
    """Every image went through one forward pass, on the CPU where load_model leaves the checkpoint: images now go
    ``--batch-size`` at a time (the same words), on ``--device`` (by default eval's), and a device this machine
    cannot use is refused naming the flag, before the checkpoint is loaded."""
    from alignlm.commands import main
    from alignlm.commands import v2l as v2l_command

    model, loads, passes = build_model(compose("model=tiny", "model/connector=v2l").model).eval(), [], []
    model.vision.register_forward_hook(lambda module, inputs, output: passes.append(len(inputs[0])))
    monkeypatch.setattr(v2l_command, "load_model", lambda *a: loads.append(a[0]) or model)
    monkeypatch.setattr(v2l_command, "final_image_reading", lambda ck: PADDED)
    args = ["v2l-words", "r/s/final", "--data", str(colour_set["pretrain"]), "--limit", "5"]
    one, batched = tmp_path / "one.json", tmp_path / "batched.json"
    assert main([*args, "--json", str(one)]) == 0 and passes == [5]
    passes.clear()
    assert main([*args, "--batch-size", "2", "--json", str(batched)]) == 0 and passes == [2, 2, 1]
    assert json.loads(batched.read_text()) == json.loads(one.read_text())
    devices = []
    monkeypatch.setattr(v2l_command, "default_device", lambda: "meta")  # stands in for the GPU eval would take
    monkeypatch.setattr(v2l_command, "image_words", lambda m, *a: devices.append(next(m.parameters()).device) or [])
    assert main(args) == 0 and devices == [torch.device("meta")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loads.clear()
    with pytest.raises(SystemExit):
        main([*args, "--device", "cuda:0"])
    assert "argument --device: 'cuda:0': this machine has no CUDA device" in capsys.readouterr().err and loads == []


def test_the_word_search_is_float32_under_bf16_autocast():
    """Under bf16 autocast the cosines to the codebook ran as a bf16 matmul: the word fed to the LLM was not always the
    nearest by cosine (8 of 256 tokens on a random 30k-word table), nor what ``words`` prints, and the diversity
    softmax at temperature 0.01 was off by up to 0.017."""
    torch.manual_seed(0)
    conn = V2LConnector(64, 576, global_tokens=0, reconstruction_weight=0)
    conn.table, conn.vocab_ids = torch.randn(30000, 576) * 0.02, torch.arange(30000)
    z = torch.randn(256, 576)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = conn._similarity(z)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, conn._similarity(z))


def test_v2l_words_read_a_tower_stored_in_bf16(v2l_model, colour_set):
    """`alignlm v2l-words` handed the connector the tower's features as they came: a tower loaded in bf16
    (``model.vision.dtype``) met the fp32 connector in a dtype error at its first batch; the words are those of the
    fp32 tower's features rounded to bf16."""
    from alignlm.commands.v2l import image_words

    paths = sorted((colour_set["pretrain"].parent / "images").glob("*.png"))[:3]
    model = v2l_model.eval()
    model.vision.to(torch.bfloat16)
    ids = image_words(model, paths, PADDED, batch_size=2)
    assert len(ids) == 3 and all(len(row) == model.num_image_tokens for row in ids)
