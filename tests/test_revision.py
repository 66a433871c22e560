"""ReVision: the dual-encoder tower, the text-embedding data hook and collator, the prepare steps, the `+exp=revision`
chain with tiny models, and the zero-shot analysis of experiments/revision."""

from __future__ import annotations

import copy
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alignlm.constants import IGNORE_INDEX
from alignlm.data.build import build_dataset
from alignlm.data.collate import Collator, Skipped
from alignlm.data.images import preprocess
from alignlm.data.records import DataError
from alignlm.methods.revision.realign import ReAlignStats, fit
from alignlm.methods.revision.shards import shard_metadata, write_shard
from alignlm.methods.revision.tower import DualEncoderTower
from alignlm.pipeline import run_prepare_steps
from tests.conftest import compose, waits_in_training_steps

ZERO_SHOT = runpy.run_path(str(Path(__file__).parents[1] / "experiments" / "revision" / "zero_shot.py"))


def noise_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_tower_puts_the_unit_global_embedding_on_every_token(tiny_clip):
    from alignlm.models.encoders import HFDualEncoder

    tower = DualEncoderTower(str(tiny_clip), num_tokens=5)
    encoder = HFDualEncoder(str(tiny_clip))
    assert tower.image_spec == encoder.image_spec and (tower.hidden_size, tower.num_patches) == (16, 5)
    images = noise_images(3)
    out = tower(torch.stack([preprocess(im, tower.image_spec) for im in images]))
    assert out.shape == (3, 5, 16) and (out == out[:, :1]).all()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 5))
    # the tower sees what `alignlm embed` saw for the same images
    torch.testing.assert_close(out[:, 0], F.normalize(encoder.encode_images(images), dim=-1), atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in tower.parameters())
    with pytest.raises(ValueError, match="stage.parts.vision must be frozen"):
        tower.requires_grad_(True)
    tower.scale = 4.0  # model.vision.scale: the norm the connector sees
    torch.testing.assert_close(tower(torch.zeros(1, 3, 32, 32)).norm(dim=-1), torch.full((1, 5), 4.0))


def test_tower_on_the_offline_dual_encoder_matches_its_embeddings(tmp_path):
    from alignlm.data.images import ImageSpec
    from alignlm.models.encoders import OfflineDualEncoder

    torch.manual_seed(0)
    encoder = OfflineDualEncoder(dim=8, image_size=64)
    encoder.save(tmp_path / "enc")
    tower = DualEncoderTower(str(tmp_path / "enc"), num_tokens=3)
    assert tower.image_spec == ImageSpec(64, (0.5,) * 3, (0.5,) * 3) and tower.hidden_size == 8
    images = noise_images(2, size=50)
    out = tower.eval()(torch.stack([preprocess(im, tower.image_spec) for im in images]))
    torch.testing.assert_close(out[:, 2], F.normalize(encoder.encode_images(images), dim=-1), atol=1e-5, rtol=1e-4)


@pytest.fixture
def text_shards(tmp_path, colour_set):
    """Random 32-d caption 'embeddings' of the colour set's pretrain records (p0..p47), in two shards."""
    vectors = torch.randn(48, 32, generator=torch.Generator().manual_seed(1)) * 3 + 1
    ids = [f"p{i}" for i in range(48)]
    for k, rows in enumerate((slice(0, 30), slice(30, 48))):
        write_shard(
            tmp_path / "texts" / f"shard_{k:05d}.safetensors", vectors[rows], shard_metadata(ids[rows], "enc", "texts")
        )
    return tmp_path / "texts", dict(zip(ids, vectors))


def revision_data(colour_set, folder, **extra) -> dict:
    hook = {"_target_": "alignlm.methods.revision.text_embeds.TextEmbeddingHook", "text_embeds": str(folder), **extra}
    return {"sources": [{"path": str(colour_set["pretrain"])}], "hooks": {"text_embeds": hook}}


def test_revision_dataset_feeds_each_records_caption_embedding(tiny_model, colour_set, text_shards, tmp_path):
    model = tiny_model()  # tiny CLIP-ViT tower: 16 tokens of width 32
    folder, vectors = text_shards
    ds = build_dataset(revision_data(colour_set, folder), model, seed=0)
    for i in (0, 7, 40):
        sample = ds[i]
        assert sample["pixel_values"] is None and sample["image_embeds"].shape == (1, 16, 32)
        expected = F.normalize(vectors[sample["id"]], dim=-1).expand(16, -1)
        torch.testing.assert_close(sample["image_embeds"][0], expected)
        caption = model.tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX])
        assert "square" in caption and (sample["input_ids"] == model.image_token_id).sum() == model.num_image_tokens

    # with ReAlign statistics, the embedding is the ReAligned caption
    write_shard(
        tmp_path / "images" / "shard_00000.safetensors",
        torch.randn(40, 32) - 2,
        shard_metadata([str(i) for i in range(40)], "enc", "images"),
    )
    fit(tmp_path / "images", folder).save(tmp_path / "realign.safetensors")
    ds = build_dataset(revision_data(colour_set, folder, realign=str(tmp_path / "realign.safetensors")), model, seed=0)
    sample = ds[3]
    stats = ReAlignStats.load(tmp_path / "realign.safetensors")
    torch.testing.assert_close(sample["image_embeds"][0, 0], stats(vectors[sample["id"]][None])[0].float())

    model.vision.scale = 2.0  # a DualEncoderTower's scale: text embeddings get the norm image embeddings get
    sample = build_dataset(revision_data(colour_set, folder), model, seed=0)[3]
    torch.testing.assert_close(sample["image_embeds"][0, 0], 2 * F.normalize(vectors[sample["id"]], dim=-1))


def test_caption_embeddings_of_other_encoder_weights_than_the_towers_are_refused(tiny_model, colour_set, tmp_path):
    """Every fitted encoder has the default name: a seed sweep sharing one embeddings folder pretrained seed 1 on seed
    0's caption embeddings, the shards and the tower compared by name only. The weights' fingerprints decide."""
    from types import SimpleNamespace

    vectors, ids = torch.randn(48, 32, generator=torch.Generator().manual_seed(1)), [f"p{i}" for i in range(48)]
    meta = shard_metadata(ids, "enc", "texts", encoder_fingerprint="seed0weights")
    write_shard(tmp_path / "texts" / "shard_00000.safetensors", vectors, meta)
    model = tiny_model()
    model.vision.encoder = SimpleNamespace(fingerprint=lambda: "seed1weights")  # the tower's own dual encoder
    with pytest.raises(DataError, match=r"was embedded by encoder weights \['seed0weights'\], but model.vision's encoder has weights seed1weights"):  # fmt: skip
        build_dataset(revision_data(colour_set, tmp_path / "texts"), model, seed=0)
    model.vision.encoder = SimpleNamespace(fingerprint=lambda: "seed0weights")
    assert len(build_dataset(revision_data(colour_set, tmp_path / "texts"), model, seed=0)) == 48


def test_caption_embeddings_serve_the_same_encoder_stored_in_bf16(tiny_model, colour_set, tmp_path):
    """Under mixed_precision=bf16 the trainer stores the frozen dual-encoder tower in bf16, whose weights hashed as
    stored were another encoder to the fp32 encoder that embedded the captions: every bf16 ReVision run was refused at
    its start, after its prepare steps. The fingerprint takes the weights at bf16's resolution; another encoder is
    still another fingerprint, and shards that recorded the weights as stored (before) still match in fp32."""
    from alignlm.models.encoders import OfflineDualEncoder, weights_fingerprint

    encoder = OfflineDualEncoder(dim=8, image_size=64)
    vectors, ids = torch.randn(48, 8, generator=torch.Generator().manual_seed(1)), [f"p{i}" for i in range(48)]
    meta = shard_metadata(ids, "enc", "texts", encoder_fingerprint=encoder.fingerprint())
    write_shard(tmp_path / "texts" / "shard_00000.safetensors", vectors, meta)
    stored = weights_fingerprint(encoder, repr(encoder.image_spec))  # what shards recorded before
    write_shard(tmp_path / "old" / "shard_00000.safetensors", vectors, {**meta, "encoder_fingerprint": stored})
    model = tiny_model()
    model.vision.encoder = encoder
    model.vision.hidden_size = 8
    assert len(build_dataset(revision_data(colour_set, tmp_path / "old"), model, seed=0)) == 48
    encoder.to(torch.bfloat16)  # as the trainer stores a frozen part under bf16
    assert len(build_dataset(revision_data(colour_set, tmp_path / "texts"), model, seed=0)) == 48
    other = copy.deepcopy(encoder)
    with torch.no_grad():
        next(p for p in other.parameters() if p.ndim == 2)[0, 0] += 1.0  # one weight moved
    assert other.fingerprint() != encoder.fingerprint()
    model.vision.encoder = other
    with pytest.raises(DataError, match="was embedded by encoder weights"):
        build_dataset(revision_data(colour_set, tmp_path / "texts"), model, seed=0)


def test_embed_noise_perturbs_each_caption_reproducibly_and_stays_on_the_sphere(tiny_model, colour_set, text_shards):
    model = tiny_model()
    folder, vectors = text_shards
    clean = build_dataset(revision_data(colour_set, folder), model, seed=0)
    noisy = build_dataset(revision_data(colour_set, folder, embed_noise=0.1), model, seed=0)
    again = build_dataset(revision_data(colour_set, folder, embed_noise=0.1), model, seed=0)
    other = build_dataset(revision_data(colour_set, folder, embed_noise=0.1), model, seed=1)
    a, b = clean[5]["image_embeds"][0], noisy[5]["image_embeds"][0]
    torch.testing.assert_close(b.norm(dim=-1), torch.ones(16))
    cos = (a[0] * b[0]).sum().item()
    assert 0.4 < cos < 0.95  # 32 coordinates of std 0.1: noise of norm ~0.57 against a unit vector
    assert torch.equal(b, again[5]["image_embeds"][0]) and torch.equal(b[0], b[-1])  # one draw, on every token
    assert not torch.equal(b, other[5]["image_embeds"][0])
    with pytest.raises(DataError, match="embed_noise=-0.1 must be a finite number >= 0"):
        build_dataset(revision_data(colour_set, folder, embed_noise=-0.1), model, seed=0)


def test_revision_dataset_errors_name_the_config_key(tiny_model, colour_set, text_shards, tmp_path):
    model = tiny_model()
    folder, vectors = text_shards
    (folder / "shard_00001.safetensors").unlink()  # p30..p47 now have no embedding
    with pytest.raises(DataError, match=r"text_embeds=.* no embedding for 18 of 48 .*first: \['p30'"):
        build_dataset(revision_data(colour_set, folder), model, seed=0)
    write_shard(
        tmp_path / "narrow" / "s.safetensors", torch.randn(48, 12), shard_metadata(list(vectors), "enc", "texts")
    )
    with pytest.raises(DataError, match="12-d embeddings but model.vision gives 32-d"):
        build_dataset(revision_data(colour_set, tmp_path / "narrow"), model, seed=0)
    with pytest.raises(
        ValueError, match=r"(?s)data.hooks.text_embeds .* could not be built.*unexpected keyword argument 'text_embed'"
    ):
        build_dataset(revision_data(colour_set, folder, text_embed="typo"), model, seed=0)
    with pytest.raises(TypeError, match="not an alignlm SampleHook"):
        build_dataset(
            {**revision_data(colour_set, folder), "hooks": {"x": {"_target_": "builtins.dict"}}}, model, seed=0
        )


def test_embeddings_that_are_not_finite_are_never_written_and_a_row_without_direction_is_never_served(
    tiny_model, colour_set, text_shards, tmp_path
):
    from safetensors.torch import save_file

    folder, vectors = text_shards
    bad = torch.stack(list(vectors.values()))
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="1 embeddings are not finite: not written"):
        write_shard(tmp_path / "nan" / "s.safetensors", bad, shard_metadata(list(vectors), "enc", "texts"))
    assert not (tmp_path / "nan" / "s.safetensors").exists()
    bad[3] = 0.0  # a table written by another tool: a zero row would be served as a zero "image"
    (tmp_path / "zero").mkdir()
    save_file(
        {"embeddings": bad}, str(tmp_path / "zero" / "s.safetensors"), shard_metadata(list(vectors), "enc", "texts")
    )
    ds = build_dataset(revision_data(colour_set, tmp_path / "zero"), tiny_model(), seed=0)
    which = next(i for i in range(len(ds)) if ds.record(i)[1]["id"] == "p3")
    skipped = ds[which]
    assert isinstance(skipped, Skipped) and "'p3' is not finite or all zeros" in skipped.reason


def test_collator_concatenates_embeddings_in_order_and_the_model_takes_them(tiny_model, colour_set, text_shards):
    model = tiny_model()
    folder, vectors = text_shards
    ds = build_dataset(revision_data(colour_set, folder), model, seed=0)
    samples = [ds[i] for i in (5, 0, 9)]
    batch = Collator(model.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"] is None and batch["image_embeds"].shape == (3, 16, 32)
    for row, sample in zip(batch["image_embeds"], samples):
        torch.testing.assert_close(row, sample["image_embeds"][0])
    out = model(batch)
    assert torch.isfinite(out.lm_loss) and out.vision_features is batch["image_embeds"]


def test_revision_chain_embeds_realigns_pretrains_on_captions_then_finetunes(tiny_clip, colour_set, tmp_path):
    from alignlm.pipeline import run

    # the pretrain captions without their images: the text-only stage must never need one
    records = json.loads(colour_set["pretrain"].read_text())
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([{k: v for k, v in r.items() if k != "image"} for r in records]))
    emb = tmp_path / "emb"
    args = [
        "+exp=revision",
        "model/llm=tiny",
        f"output_dir={tmp_path}",
        "run_name=r",
        "offline_datasets=[]",
        f"revision.encoder={tiny_clip}",
        "revision.fit=null",
        f"revision.embeddings={emb}",
        f"revision.images=[{colour_set['pretrain']}]",
        f"revision.texts=[{captions}]",
        "model.vision.num_tokens=4",
        "stages.pretrain.max_steps=4",
        "stages.finetune.max_steps=3",
        "stages.pretrain.per_device_batch_size=4",
        "stages.finetune.per_device_batch_size=4",
        "stages.finetune.data.template=vicuna_v1",
        "stages.finetune.data.template_args={}",
        f"stages.pretrain.data.sources=[{{path:{captions}}}]",
        f"stages.finetune.data.sources=[{{path:{colour_set['instruct']}}}]",
        f"eval.sets=[{{name:colours,path:{colour_set['test']}}}]",
        "eval.limit=4",
    ]
    cfg = compose(*args)
    summary = run(cfg)
    assert [summary["stages"][s]["steps"] for s in ("pretrain", "finetune")] == [4, 3]
    assert summary["stages"]["pretrain"]["skipped"] == 0 and summary["eval"]["colours"]["n"] == 4
    assert [p.name for p in sorted((emb / "texts").iterdir())] == ["shard_00000.safetensors"]
    stats = ReAlignStats.load(emb / "realign.safetensors")
    assert (stats.n_image, stats.n_text, stats.encoder) == (48, 48, str(tiny_clip))

    # a rerun skips every finished step (encoder, shards, statistics and stages) and keeps the stages' figures
    stamps = {p: p.stat().st_mtime_ns for p in [emb / "realign.safetensors", *emb.rglob("shard_*")]}
    assert run(cfg)["stages"] == summary["stages"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    for stage in ("pretrain", "finetune"):  # caption embeddings for images, then the dual-encoder tower: no waits
        fused = compose(
            *args, "run_name=waits", f"stages.{stage}.fused_optimizer=true", f"stages.{stage}.init_from=null"
        )
        ops, rows = waits_in_training_steps(fused, stage)
        assert ops.seen == [] and len(rows) == 2


def test_a_prepare_step_with_an_unknown_knob_is_refused_naming_it():
    cfg = compose(
        "+exp=revision",
        "run=[pretrain]",
        "stages.pretrain.prepare.revision_encoder=null",
        "stages.pretrain.prepare.revision_embeddings=null",
        "+stages.pretrain.prepare.revision_realign.realing=x",
    )
    with pytest.raises(
        ValueError, match=r"(?s)stages.pretrain.prepare.revision_realign .* unexpected keyword argument 'realing'"
    ):
        run_prepare_steps(cfg)


def test_realign_statistics_are_fitted_with_the_configured_covariance_and_never_reused_across_it(tmp_path):
    from alignlm.methods.revision.prepare import ensure_realign

    g = torch.Generator().manual_seed(0)
    emb = tmp_path / "emb"
    for modality, shift in (("images", 3.0), ("texts", -3.0)):
        rows = torch.randn(64, 8, generator=g) + shift
        write_shard(
            emb / modality / "shard_00000.safetensors",
            rows,
            shard_metadata([f"{modality}{i}" for i in range(64)], "toy", modality),
        )
    node = {"embeddings": str(emb), "realign": str(tmp_path / "cov.safetensors"), "covariance": 0.5}
    ensure_realign(**node)
    assert ReAlignStats.load(tmp_path / "cov.safetensors").covariance == 0.5
    ensure_realign(**node)  # same knob: kept
    with pytest.raises(ValueError, match=r"fitted with covariance=0.5, but revision.covariance=None"):
        ensure_realign(**{**node, "covariance": None})
    ensure_realign(**{**node, "realign": str(tmp_path / "trace.safetensors"), "covariance": None})
    assert ReAlignStats.load(tmp_path / "trace.safetensors").A is None


def test_an_encoder_refitted_in_place_gets_its_captions_embedded_and_realign_fitted_again(
    tiny_clip, colour_set, tmp_path
):
    """A refitted encoder keeps its folder and name (`alignlm dual-encoder fit` writes one default name): the shards
    and ReAlign's statistics made with the old weights are made again, not reused (pretraining read the old space
    while finetuning's tower used the new one)."""
    import shutil

    from transformers import CLIPModel

    from alignlm.methods.revision.embed import collect_texts
    from alignlm.methods.revision.prepare import ensure_embeddings, ensure_realign
    from alignlm.methods.revision.shards import list_shards
    from alignlm.models.encoders import HFDualEncoder

    encoder, emb = tmp_path / "dual_encoder", tmp_path / "emb"
    shutil.copytree(tiny_clip, encoder)
    records = [str(colour_set["pretrain"])]
    node = {"encoder": str(encoder), "embeddings": str(emb), "images": records, "texts": records, "device": "cpu"}
    realign = {"embeddings": str(emb), "realign": str(emb / "realign.safetensors")}
    ensure_embeddings(**node)
    ensure_realign(**realign)
    kept = {p: p.stat().st_mtime_ns for p in [emb / "realign.safetensors", *emb.rglob("shard_*")]}
    ensure_embeddings(**node)  # the same weights: everything kept
    ensure_realign(**realign)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept

    model = CLIPModel.from_pretrained(encoder)
    with torch.no_grad():  # the refit: other weights, same folder, same name
        for head in (model.visual_projection, model.text_projection):
            head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(encoder)
    ensure_embeddings(**node)
    ensure_realign(**realign)

    refitted = HFDualEncoder(str(encoder))
    texts = np.concatenate([x.copy() for shard in list_shards(emb / "texts") for x in shard.chunks(100)])
    captions = [text for _, text in collect_texts(colour_set["pretrain"])]
    np.testing.assert_allclose(texts, refitted.encode_texts(captions).numpy(), atol=1e-5)
    stats, expected = ReAlignStats.load(emb / "realign.safetensors"), fit(emb / "images", emb / "texts")
    torch.testing.assert_close(stats.mu_y, expected.mu_y)
    torch.testing.assert_close(stats.mu_x, expected.mu_x)


def test_realign_is_fitted_again_on_exactly_the_items_the_lists_name_now(tiny_clip, colour_set, tmp_path):
    """revision.images narrowed from two sets to one: the shards of the second stayed in the folder and ReAlign's
    statistics (fitted on the whole folder) kept counting them; statistics already fitted were kept whatever the
    lists said."""
    from alignlm.methods.revision.prepare import ensure_embeddings, ensure_realign

    records = json.loads(colour_set["pretrain"].read_text())
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    (tmp_path / "images").symlink_to(colour_set["pretrain"].parent / "images", target_is_directory=True)
    first.write_text(json.dumps(records[:16]))
    second.write_text(json.dumps(records[16:32]))
    emb, stats = tmp_path / "emb", tmp_path / "emb" / "realign.safetensors"
    node = {"encoder": str(tiny_clip), "embeddings": str(emb), "texts": [str(first)], "shard_size": 8, "device": "cpu"}
    ensure_embeddings(**node, images=[str(first), str(second)])
    ensure_realign(str(emb), str(stats))
    assert ReAlignStats.load(stats).n_image == 32
    ensure_embeddings(**node, images=[str(first)])
    ensure_realign(str(emb), str(stats))
    assert ReAlignStats.load(stats).n_image == 16
    expected = fit(emb / "images", emb / "texts")
    torch.testing.assert_close(ReAlignStats.load(stats).mu_x, expected.mu_x)


def test_zero_shot_scores_are_the_training_loss_of_each_candidate(tiny_model):
    candidate_batch, candidate_losses, classify = (
        ZERO_SHOT[k] for k in ("candidate_batch", "candidate_losses", "classify")
    )
    model = tiny_model().eval()
    candidates = ["A red square.", "Two blue circles in the top left.", "A green triangle."]
    embeds = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    losses = candidate_losses(model, embeds, candidates)
    assert losses.shape == (2, 3) and torch.isfinite(losses).all()
    batch = candidate_batch(model, candidates)
    for c, text in enumerate(candidates):  # supervised: the caption and the plain template's newline, nothing else
        row = batch["labels"][c]
        assert model.tokenizer.decode(row[row != IGNORE_INDEX]) == text + "\n"
        assert (batch["input_ids"][c] == model.image_token_id).sum() == model.num_image_tokens
    for m in range(2):  # each score is the model's own training loss for that candidate alone
        for c in range(3):
            one = {k: v[c : c + 1] for k, v in batch.items()}
            one["image_embeds"] = embeds[m][None, None].expand(1, model.num_image_tokens, -1)
            torch.testing.assert_close(losses[m, c], model(one).lm_loss_sum, rtol=1e-4, atol=1e-4)
    assert classify(model, embeds, candidates, ["r", "b", "g"]) == [["r", "b", "g"][int(i)] for i in losses.argmin(1)]
    with pytest.raises(ValueError, match="2 labels for 3 candidates"):
        classify(model, embeds, candidates, ["r", "b"])


def test_factor_shares_split_a_grid_into_its_main_effects_and_interaction():
    factor_shares = ZERO_SHOT["factor_shares"]
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.randn(4, 1, 16, generator=g), torch.randn(1, 10, 16, generator=g)
    only_rows = factor_shares(rows.expand(4, 10, 16) + 5.0)
    assert only_rows["a"] == pytest.approx(1.0) and only_rows["b"] == pytest.approx(0.0, abs=1e-12)
    mixed = factor_shares(rows + cols + 0.01 * torch.randn(4, 10, 16, generator=g))
    assert sum(mixed.values()) == pytest.approx(1.0) and 0 < mixed["interaction"] < 0.01
    with pytest.raises(ValueError, match=r"\[A, B, D\] grid"):
        factor_shares(torch.randn(40, 16))
