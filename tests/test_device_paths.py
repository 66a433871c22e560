"""Branches that only a GPU run takes, simulated on the CPU: the CUDA generators that seeding reaches, CUDA topk's
order of tied entries, and the loader workers that ``num_workers: auto`` starts on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.cuda.random as cuda_random
from torch.utils.data import DataLoader, Dataset

from alignlm.commands import BAD_DATA, console
from alignlm.data.llava import error_message
from alignlm.data.records import UNREADABLE_IMAGE, DataError
from alignlm.geometry import metrics as M
from alignlm.pipeline import make_accelerator
from alignlm.training.trainer import Trainer
from tests.conftest import compose, tiny_overrides, write_colour_set

# ----------------------------------------------------------------------------------------- seeds on the GPU


def gpus(monkeypatch: pytest.MonkeyPatch, visible: int) -> list[torch.Generator]:
    """``visible`` stand-in CUDA generators that torch's own torch.cuda RNG functions (``torch.manual_seed``'s
    seeding of every GPU, ``get_rng_state``, ``set_rng_state``) act on, CUDA initialised; each seeded 1000 + i."""
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(visible)]
    monkeypatch.setattr(torch.cuda, "default_generators", tuple(generators))
    for module in (torch.cuda, cuda_random):
        monkeypatch.setattr(module, "current_device", lambda: 0)
        monkeypatch.setattr(module, "device_count", lambda: visible)
    monkeypatch.setattr(cuda_random, "_lazy_init", lambda: None)
    monkeypatch.setattr(cuda_random, "_lazy_call", lambda callback, **kwargs: callback())
    for module in (torch.cuda, cuda_random):
        monkeypatch.setattr(module, "is_initialized", lambda: True)
    return generators


def test_building_a_model_leaves_every_cuda_generator_as_it_found_it(monkeypatch, tiny_model):
    """``build_model`` seeds its initialisation with ``torch.manual_seed(model.init_seed + k)``, which seeds every GPU
    too; only the CPU generator was forked, so each build left the GPUs seeded with the init seed."""
    generators = gpus(monkeypatch, visible=2)
    before = [g.get_state() for g in generators]
    tiny_model("+model/align_levels=aligngpt")  # an extra part: the third seeded init
    assert all(torch.equal(g.get_state(), state) for g, state in zip(generators, before))


def test_building_a_model_leaves_cuda_uninitialised_where_nothing_initialised_it(monkeypatch, tiny_model):
    """A ``--cpu`` run on a GPU machine: the build forked every GPU's generator, which initialised CUDA in each rank on
    every visible GPU. Where CUDA is not initialised, the build neither initialises it nor queues a seed for its first
    use (``torch.manual_seed`` queues one), so the stage's own seed stays the one queued."""
    queued = []

    def initialise():
        raise AssertionError("the build initialised CUDA")

    monkeypatch.setattr(cuda_random, "_lazy_init", initialise)
    monkeypatch.setattr(cuda_random, "_lazy_call", lambda callback, **kwargs: queued.append(callback))
    for module in (torch.cuda, cuda_random):
        monkeypatch.setattr(module, "is_initialized", lambda: False)
        monkeypatch.setattr(module, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: what counts is CUDA's state
    state = torch.random.get_rng_state()
    model = tiny_model("+model/align_levels=aligngpt")
    assert queued == [] and torch.equal(torch.random.get_rng_state(), state)
    again = tiny_model("+model/align_levels=aligngpt")  # the init seed still decides the weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_stages_draws_on_the_gpu_follow_seed(monkeypatch, tmp_path):
    """After a stage's set-up (``torch.manual_seed(seed)``, then the model built) the GPU draws (dropout, LoRA
    dropout, SEA's label sampling) start from ``seed``: they were the same for every seed, seeded with
    ``model.init_seed + 1`` by the last init of the build."""
    sets = write_colour_set(tmp_path / "colours", n=8)
    cfg = compose(*tiny_overrides(sets, tmp_path / "out"), "run=[pretrain]", "seed=5", "deterministic=false")
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    generators = gpus(monkeypatch, visible=1)
    try:
        trainer.setup_model()
    finally:
        trainer.release()
    assert torch.equal(generators[0].get_state(), torch.Generator().manual_seed(5).get_state())


# ----------------------------------------------------------------------------------------- kNN ties on the GPU

RANKED = ("cycle_knn", "lcs_knn", "edit_distance_knn")


def topk_ties_highest_index_first(self, k, dim=-1, largest=True, sorted=True):
    """``Tensor.topk`` with exact ties in the other order, as CUDA's kernel may give them (pytorch#127196)."""
    flipped = ORIGINAL_TOPK(self.flip(dim), k, dim=dim, largest=largest, sorted=sorted)
    return torch.return_types.topk((flipped.values, self.shape[dim] - 1 - flipped.indices))


ORIGINAL_TOPK = torch.Tensor.topk


def duplicated_pair(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image 4 times and every caption 6 times (several captions per image; repeated captions), integer
    features so that the inner products of duplicates tie exactly."""
    g = torch.Generator().manual_seed(0)
    images, captions = torch.randint(-3, 4, (6, 8), generator=g), torch.randint(-3, 4, (4, 8), generator=g)
    return images[torch.arange(n) % 6].double(), captions[torch.arange(n) % 4].double()


def item_order_knn(x: torch.Tensor, k: int) -> list[list[int]]:
    """Each item's k most similar other items, most similar first, an exact tie to the earlier item."""
    sim = (x @ x.T).tolist()
    return [sorted((j for j in range(len(x)) if j != i), key=lambda j: (-sim[i][j], j))[:k] for i in range(len(x))]


@pytest.mark.parametrize("name", RANKED)
def test_ranked_knn_metrics_break_exact_ties_by_item_order_whatever_topk_does(monkeypatch, name):
    """The ranked-list metrics of a probe with duplicates were one value on the CPU and another on a GPU, whose topk
    orders tied entries otherwise; the CPU's was not item order either, as documented."""
    A, B = duplicated_pair()
    got = getattr(M, name)(A, B, topk=5, preprocess=False)
    monkeypatch.setattr(torch.Tensor, "topk", topk_ties_highest_index_first)
    assert getattr(M, name)(A, B, topk=5, preprocess=False) == got
    monkeypatch.setattr(torch.Tensor, "topk", ORIGINAL_TOPK)
    for x in (A, B):
        assert M._knn(x, 5).tolist() == item_order_knn(x, 5)


# ----------------------------------------------------------------------------------------- loader workers


class Unreadable(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        if i == 1:
            try:
                raise OSError("cannot identify image file 'x.png'")
            except OSError as e:
                raise DataError("record id=r1 in d.json: cannot read image x.png", UNREADABLE_IMAGE) from e
        return i


def test_a_data_error_raised_in_a_loader_worker_is_its_own_message():
    """PyTorch re-raises a worker's exception with the worker's whole traceback as its message."""
    with pytest.raises(DataError) as raised:
        list(DataLoader(Unreadable(), batch_size=1, num_workers=1))
    assert "Original Traceback" in str(raised.value)
    assert error_message(raised.value) == "record id=r1 in d.json: cannot read image x.png"
    assert error_message(DataError("in this process\nsecond line")) == "in this process\nsecond line"


def test_on_error_raise_with_loader_workers_says_one_line(tmp_path, capsys):
    """``on_error: raise`` and a damaged image, with two loader workers (what ``num_workers: auto`` gives on CUDA):
    the one line and exit status 65 of a run without workers, where it printed PyTorch's 50-line re-raise."""
    sets = write_colour_set(tmp_path / "colours", n=8)
    (tmp_path / "colours" / "images" / "3.png").write_bytes(b"not a png")
    args = tiny_overrides(
        sets,
        tmp_path / "out",
        "run=[pretrain]",
        "stages.pretrain.data.on_error=raise",
        "stages.pretrain.data.num_workers=2",
        "deterministic=false",
    )
    assert console(["train", *args]) == BAD_DATA
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("alignlm")] == [
        f"alignlm: record id=p3 in {sets['pretrain']}: cannot read image {tmp_path}/colours/images/3.png: "
        "not an image of the formats read (PNG, JPEG, WEBP, GIF, BMP, TIFF)"
    ]
