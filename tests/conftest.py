"""Shared fixtures: a tiny LLaVA-format dataset on disk and tiny models composed from the real config tree."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from alignlm.constants import IGNORE_INDEX
from alignlm.training.determinism import ENV as DETERMINISTIC_ENV
from alignlm.training.determinism import strict

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}

# fp32 means fp32 in the tests on a GPU as well: cuDNN would run convolutions (the towers' patch embeddings) in TF32
torch.backends.cudnn.allow_tf32 = False
# cuBLAS reads its workspace setting when the process first uses it: set here, before any test touches a GPU, what a
# deterministic run (tiny_overrides) sets for its own process (training/determinism.py)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_ENV["CUBLAS_WORKSPACE_CONFIG"])
# and for the processes the tests launch (a killed run's rerun, two-rank runs), which the flag above does not reach:
# NVIDIA's libraries read this variable, so their convolutions run in fp32 like this process's
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

# scripts/test.sh runs the suite in several pytest-xdist workers, one per core: each computes on one thread, and so do
# the processes it launches (a worker with every core's threads would slow the others several times over)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# A test that launches several ranks (torchrun, accelerate launch, spawned gloo groups) runs in one worker with the
# others like it, one at a time (`--dist loadgroup`): two at once would put four ranks on two cores, past the short
# collective timeouts some of them set. Without xdist the mark does nothing.
RANKS = pytest.mark.xdist_group("ranks")
_RUNNING: list[pytest.Item] = []  # the test being run (running_test)


@pytest.fixture(autouse=True)
def running_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Keeps the running test at hand for :func:`free_port`, which checks its marks."""
    _RUNNING.append(request.node)
    yield
    _RUNNING.pop()


def free_port() -> int:
    """A free loopback port for the ranks a test launches to meet on. Every launch of ranks asks for one, so this is
    where a test that launches them without ``RANKS`` is stopped, naming the mark: run beside the other such tests,
    it would be the one to time out, now and then, on two cores."""
    item = _RUNNING[-1] if _RUNNING else None
    if item is not None and not any(m.args[:1] == ("ranks",) for m in item.iter_markers("xdist_group")):
        pytest.fail(f"{item.nodeid} launches ranks: mark it @RANKS (tests/conftest.py)", pytrace=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ops whose result the host must wait for on a GPU: a scalar read, or an output whose size depends on the data
WAITING_OPS = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.bincount.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
    # a tensor made from Python data (``torch.tensor(...)``, ``torch.as_tensor(number)``): on a GPU a blocking
    # host-to-device copy. ``x[i] = value`` shows the same op here, harmless on a GPU (the value stays a CPU scalar):
    # fill with ``index_fill_`` or ``masked_fill`` instead, which name no tensor of the value
    "aten.lift_fresh.default",
}


# ops with no deterministic CUDA kernel (PyTorch's list for torch.use_deterministic_algorithms): each would stop a
# `deterministic: true` run on a GPU. Forward ops always, or when the argument at the given position has the value:
NO_DETERMINISTIC_CUDA_KERNEL = (
    "aten.kthvalue",
    "aten.median.dim",
    "aten.nanmedian.dim",
    "aten.histc",
    "aten.put",
    "aten.max_unpool",
)
NO_DETERMINISTIC_WHEN = {
    "aten.bincount": (1, lambda weights: weights is not None),
    "aten.scatter_reduce": (4, lambda reduce: reduce == "prod"),
    "aten.nll_loss2d_forward": (3, lambda reduction: reduction != 0),  # 0: reduction="none"
    "aten._embedding_bag_backward": (8, lambda mode: mode == 2),  # 2: mode="max"
    "aten._embedding_bag_dense_backward": (7, lambda mode: mode == 2),
}
# backward passes (of the inputs' gradients)
BACKWARDS_WITHOUT_ONE = (
    "avg_pool3d_backward",
    "adaptive_avg_pool2d_backward",
    "adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward",
    "fractional_max_pool",
    "upsample_linear1d",
    "upsample_bilinear2d",
    "upsample_bicubic2d",
    "upsample_trilinear3d",
    "reflection_pad",
    "ctc_loss_backward",
    "grid_sampler",
)


def no_deterministic_cuda_kernel(name: str, args: tuple, kwargs: dict | None = None) -> bool:
    """Whether the op ``name`` called with ``args`` and ``kwargs`` is one PyTorch's strict deterministic mode refuses
    on CUDA."""
    if name.startswith("aten.cumsum"):  # a floating point or complex result
        dtype = (kwargs or {}).get("dtype") or args[0].dtype
        return dtype.is_floating_point or dtype.is_complex
    op = ".".join(name.split(".")[:2]).rstrip("_")  # "aten.scatter_reduce_.two": the in-place form is refused too
    if op in NO_DETERMINISTIC_WHEN:
        position, refused = NO_DETERMINISTIC_WHEN[op]
        return len(args) > position and refused(args[position])
    if "_backward" in name:
        return any(k in name for k in BACKWARDS_WITHOUT_ONE)
    return name.startswith(NO_DETERMINISTIC_CUDA_KERNEL)


class StrictModeAsOnAGpu(TorchDispatchMode):
    """While PyTorch's strict deterministic mode is on (a ``deterministic: true`` run: every ``tiny_overrides`` run),
    raises on the ops it refuses on CUDA, as a GPU would, so that the CPU suite finds them before a GPU run stops at
    them. The CPU itself has a deterministic kernel for each."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if strict() and no_deterministic_cuda_kernel(str(func), args, kwargs):
            raise RuntimeError(
                f"{func} has no deterministic CUDA kernel: a `deterministic: true` run on a GPU stops here"
            )
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session", autouse=True)
def strict_mode_as_on_a_gpu():
    """Every test, session fixtures included (autouse fixtures come first in their scope), under ``StrictModeAsOnAGpu``
    on a machine without a GPU; on one with a GPU, PyTorch's own strict mode refuses the ops (and the mode would slow
    small ops and keep ``torch.compile`` eager)."""
    with contextlib.nullcontext() if torch.cuda.is_available() else StrictModeAsOnAGpu():
        yield


@contextlib.contextmanager
def without_dispatch_modes() -> Iterator[None]:
    """No Python dispatch mode inside (``StrictModeAsOnAGpu`` off): ``torch.compile`` runs its frames eagerly under
    one, silently, so a test of compiled code needs this."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


class DeviceWaits(TorchDispatchMode):
    """Records, in ``seen``, every op run inside it that would make the host wait for a GPU: the CPU stand-in for
    ``torch.cuda.set_sync_debug_mode("error")``. A boolean index counts: it is a nonzero inside the op. The CPU
    branch of ``models.mllm.check`` reads its flag (a GPU asserts on the device): patch it to ``torch._assert_async``
    where a test runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        indices = args[1] if name.startswith("aten.index") and len(args) > 1 else ()
        by_mask = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
        if name in WAITING_OPS or by_mask:
            self.seen.append(name + (" (boolean index)" if by_mask else ""))
        return func(*args, **(kwargs or {}))


# (stage, overrides) whose training steps must never wait for the GPU: checked on the CPU by DeviceWaits
# (tests/test_training.py) and on CUDA by the sync debug mode (tests/test_gpu.py)
WAIT_FREE_RECIPES = {
    "padded": ("finetune", ["stages.finetune.data.packing=false"]),
    "packed": ("finetune", ["stages.finetune.data.packing=true"]),
    "contrastive": ("pretrain", ["+objective@stages.pretrain.objectives.contrastive=contrastive"]),
    "moe-capacity": ("pretrain", ["model/connector=moe", "model.connector.capacity_factor=1.1"]),
    "v2l": ("pretrain", ["model/connector=v2l"]),
    "vlap": ("pretrain", ["+exp=vlap"]),
    "aligngpt-gate": (
        "finetune",
        [
            "+model/align_levels=aligngpt",
            "+stages.finetune.parts.align_levels=gate",
            "+stages.finetune.lr.align_levels=1e-3",
        ],
    ),
}


def waits_in_training_steps(cfg, stage: str) -> tuple[DeviceWaits, list]:
    """What ``DeviceWaits`` saw in two whole training steps, and their logged rows. A first step runs before
    (allocations, lazy set-up); batches come from the collator beforehand, as the data loader's workers make them;
    ``check`` asserts on the device, as a GPU's would. The steps run with the config's deterministic kernels, as
    ``pipeline.run`` would run them: under ``StrictModeAsOnAGpu`` an op without a deterministic CUDA kernel raises."""
    from unittest import mock

    from alignlm.models import mllm
    from alignlm.pipeline import make_accelerator
    from alignlm.training.determinism import deterministic
    from alignlm.training.trainer import Trainer

    with deterministic(bool(cfg.deterministic)):
        trainer = Trainer(cfg, stage, make_accelerator(cfg))
        trainer.setup()
        batches = iter(trainer.loader())
        trainer.step([next(batches)], 1)
        ready = [next(batches) for _ in range(2)]
        with mock.patch.object(mllm, "check", torch._assert_async), DeviceWaits() as waits:
            logs = [trainer.step([b], step) for step, b in enumerate(ready, start=2)]
        return waits, trainer.fetch(logs)  # the one wait, for both steps


def write_colour_set(root: Path, n: int = 48) -> dict[str, Path]:
    """Solid-colour images (varied aspect ratios) with captions, two-turn QA and a test set."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    pretrain, instruct, test = [], [], []
    for i in range(n):
        name = names[i % 3]
        Image.new("RGB", (40 + i % 5, 30), COLOURS[name]).save(root / "images" / f"{i}.png")
        img = f"images/{i}.png"
        pretrain.append(
            {
                "id": f"p{i}",
                "image": img,
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"A {name} square."}],
            }
        )
        instruct.append(
            {
                "id": f"q{i}",
                "image": img,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is it?"},
                    {"from": "gpt", "value": name},
                    {"from": "human", "value": "Is it a photo?"},
                    {"from": "gpt", "value": "no"},
                ],
            }
        )
        test.append(
            {
                "id": f"t{i}",
                "image": img,
                "answer": name,
                "meta": {"choices": names},
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is it?"},
                    {"from": "gpt", "value": name},
                ],
            }
        )
    paths = {}
    for key, recs in (("pretrain", pretrain), ("instruct", instruct), ("test", test[:12])):
        paths[key] = root / f"{key}.json"
        paths[key].write_text(json.dumps(recs))
    return paths


@pytest.fixture
def alignlm_log(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """The run's warnings: the ``alignlm`` logger writes to its own handler and does not propagate."""
    log = logging.getLogger("alignlm")
    # not through the root logger too: where no run had set the logger up yet (the test alone), get_logger found this
    # handler, left propagation on, and every warning was captured twice
    propagate, log.propagate = log.propagate, False
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="alignlm"):
            yield caplog
    finally:
        log.removeHandler(caplog.handler)
        log.propagate = propagate


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test gets accelerate's process-wide state (precision, device, accumulation) afresh, as a process of its
    own would: otherwise the first test's precision sticks, and a later test asking for another one fails."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def colour_set(tmp_path_factory) -> dict[str, Path]:
    return write_colour_set(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A tiny shapes set (32 px, 4x4 label grid = the tiny tower's 16 patches) with its SEA labels file."""
    from alignlm.commands import main
    from alignlm.data.shapes import generate

    root = tmp_path_factory.mktemp("sea")
    generate(root / "shapes", n_train=8, n_test=2, image_size=32, label_grid=4)
    shapes = root / "shapes"
    assert (
        main(["sea-labels", "annotations", "--data", str(shapes / "pretrain.json"), str(shapes / "test_captions.json")])
        == 0
    )
    return root


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIPModel folder with tokenizer and image processor (32 px images, 16-d joint space)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from alignlm.models.tokenizer import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    tok = build_tiny_tokenizer()
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            max_position_embeddings=32,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            **small,
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def edited_colour_set(root: Path, edit: Callable[[list[dict[str, Any]]], None]) -> dict[str, Path]:
    """An 8-record colour set whose pretraining records ``edit`` changed in place: bad data, on purpose."""
    sets = write_colour_set(root, n=8)
    records = json.loads(sets["pretrain"].read_text())
    edit(records)
    sets["pretrain"].write_text(json.dumps(records))
    return sets


def pretrain_on(sets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides for the pretraining stage alone on ``sets``' captions, the run ``t`` under ``out``."""
    return [
        f"output_dir={out}",
        "run_name=t",
        "run=[pretrain]",
        f"stages.pretrain.data.sources=[{{path:{sets['pretrain']}}}]",
        *extra,
    ]


def tiny_overrides(colour_set: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long tiny two-stage run on the colour set, in fp32 and with deterministic kernels on
    any machine (exactness tests compare numbers: on a GPU ``mixed_precision=auto`` would be bf16, and atomic
    additions would differ run to run in the last bits): a test that wants bf16 says so in ``extra``."""
    return [
        "mixed_precision=no",
        "deterministic=true",
        f"output_dir={out}",
        "run_name=t",
        "stages.pretrain.max_steps=6",
        "stages.finetune.max_steps=4",
        "stages.pretrain.per_device_batch_size=4",
        "stages.finetune.per_device_batch_size=4",
        "stages.pretrain.save_every=2",
        "stages.finetune.save_every=2",
        "stages.finetune.data.template=vicuna_v1",
        f"stages.pretrain.data.sources=[{{path:{colour_set['pretrain']}}}]",
        f"stages.finetune.data.sources=[{{path:{colour_set['instruct']}}}]",
        *extra,
    ]


def compose(*overrides: str):
    from alignlm.config import compose as _compose

    return _compose(list(overrides))


@pytest.fixture
def tiny_model():
    from alignlm.models.build import build_model

    def make(*overrides: str):
        return build_model(compose(*overrides).model)

    return make


def small_llm_shape(base, **extra: Any) -> dict[str, Any]:
    """Config sizes for a random causal LM of another family (Granite, Mistral, Gemma-3, ...) that fits the tiny
    model's tokenizer, to put beside its tower and connector."""
    return dict(
        vocab_size=base.llm.get_input_embeddings().num_embeddings,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **extra,
    )


def read_losses(stage_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in rows]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def make_batch(model, image_counts: list[int], text_len: int = 6, seed: int = 0) -> dict:
    """Sequences with ``count`` image blocks each, then supervised text; right padded by construction."""
    g = torch.Generator().manual_seed(seed)
    m, img = model.num_image_tokens, model.image_token_id
    rows, labels = [], []
    for count in image_counts:
        text = torch.randint(10, 200, (text_len,), generator=g)
        ids = torch.cat([torch.full((m,), img)] * count + [text]) if count else text
        lab = ids.clone()
        lab[ids == img] = IGNORE_INDEX
        rows.append(ids)
        labels.append(lab)
    length = max(len(r) for r in rows)
    pad = lambda xs, v: torch.stack([torch.cat([x, torch.full((length - len(x),), v)]) for x in xs])  # noqa: E731
    input_ids = pad(rows, 0)
    size = model.image_spec.size
    return {
        "input_ids": input_ids,
        "labels": pad(labels, IGNORE_INDEX),
        "attention_mask": pad([torch.ones(len(r), dtype=torch.long) for r in rows], 0),
        "pixel_values": torch.randn(sum(image_counts), 3, size, size, generator=g) if sum(image_counts) else None,
    }


def fake_monitor(**extra: Any) -> Any:
    """A stand-in for ``AlignmentMonitor`` whose call is due at every step, one metric, no layers, no probe set: its
    ``__call__`` run on this (``AlignmentMonitor.__call__(fake, step, model)``) with ``extract`` patched."""
    from types import SimpleNamespace

    return SimpleNamespace(
        due=lambda step: True,
        frozen_tower_features=lambda model: None,
        metrics=["cka"],
        probe=None,
        batch_size=2,
        layers=[],
        reading=None,
        num_workers=0,
        topk=1,
        layer_metrics=None,
        last=0.0,
        **extra,
    )
