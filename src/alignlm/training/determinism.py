"""Bitwise-reproducible runs on a GPU, on request (``deterministic: true``).

On a CPU alignlm's training is already reproducible bit for bit. On a GPU several kernels add in whatever order their
threads finish (atomic additions: ``index_add``, embedding and scatter backward passes, some cuBLAS and cuDNN
algorithms, flash-attention's backward), so two runs of one config differ in the last bits, and so does a resumed
run from an uninterrupted one. ``deterministic`` switches PyTorch to its deterministic kernels for the run (cuBLAS
with a fixed workspace, cuDNN without autotuning, the deterministic backward passes of SDPA's flash and
memory-efficient attention and of the flash-attention package) and back afterwards, at some speed. It is PyTorch's
strict mode, as ``transformers``' full determinism: with ``warn_only`` SDPA's attention backward would only warn and
stay non-deterministic. An op that has no deterministic CUDA kernel (a float ``cumsum``, ``kthvalue``, some pooling
and interpolation backward passes) stops the run at its first use with PyTorch's error naming it; the evaluation
after training only warns there (``warn_only``): sampling with top-p takes a float cumulative sum.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.utils.deterministic

# the variables the deterministic kernels read; a value the user set already is kept (":16:8" is valid for cuBLAS)
ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "FLASH_ATTENTION_DETERMINISTIC": "1"}


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """Deterministic kernels inside the block when ``on`` (else nothing changes); the previous settings after it.

    Enter it before the process first uses the GPU: cuBLAS reads its workspace setting once.
    """
    if not on:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.deterministic,
        cudnn.benchmark,
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    saved_env = {k: os.environ.get(k) for k in ENV}
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    torch.use_deterministic_algorithms(True)
    # the deterministic kernels are what reproduce a run; filling every new buffer with NaN as well (PyTorch's default
    # in this mode, against reads of memory never written) tripled a two-rank ZeRO-2 test's time on the CPU
    # (DeepSpeed's half-GiB gradient buckets)
    torch.utils.deterministic.fill_uninitialized_memory = False
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
        torch.utils.deterministic.fill_uninitialized_memory = saved[4]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def strict() -> bool:
    """Whether PyTorch's strict deterministic mode is on: an op without a deterministic kernel stops the run."""
    return torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


@contextlib.contextmanager
def warn_only() -> Iterator[None]:
    """Inside the block, where deterministic kernels are on, an op that has none warns instead of stopping the run;
    the deterministic kernels that exist stay on. Nothing changes when they are off."""
    was_strict = strict()
    if was_strict:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        if was_strict:
            torch.use_deterministic_algorithms(True)
