"""Alignment monitor: the probe metrics on a fixed probe set every N training steps, logged as ``monitor/*``.

Configured by the ``monitor`` node of ``configs/train.yaml``; the trainer calls it once per step and merges what it
returns into that step's metrics row (``metrics.jsonl`` and wandb). It measures at step 1 and every ``every`` steps,
in eval mode under ``no_grad``, with the RNG state saved and restored so a monitored run trains exactly like an
unmonitored one. While the vision tower is frozen its features of the probe images are computed once (they cannot
change; the tower is most of the cost); else the images are decoded a batch at a time at each measurement, so the
host never holds the whole set's pixels. The features and the metrics stay on the model's device; only the
numbers come back. It logs its own cost: ``monitor/seconds`` and
``monitor/time_share`` (its time over the wall time since the previous measurement, itself included), its clock
started once the device has finished the training steps queued before it. Every rank
runs it (sharded ZeRO-3 weights need all ranks in a forward); only the main process writes the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from alignlm.data.images import PADDED, ImageReading
from alignlm.data.records import DataError
from alignlm.geometry.suite import flat
from alignlm.models.probes import (
    check_probe_size,
    extract,
    image_batches,
    load_probe_set,
    needs_tokens,
    probe_metrics,
    resolve_layers,
)


def wait_for_device(device: torch.device) -> None:
    """Let the training steps already queued on a GPU finish before the monitor's clock starts: its first read back
    to the host would wait for them and count their time as its own (``monitor/seconds``, ``monitor/time_share``).
    The monitor reads back to the host anyway: this wait only moves the training's share out of its clock. A CPU
    runs every op as it is called."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AlignmentMonitor:
    """Measures alignment probes at configured steps; calling it at other steps returns nothing."""

    def __init__(
        self, cfg: Mapping[str, Any] | None, model: Any, reading: ImageReading = PADDED, num_workers: int = 0
    ) -> None:
        """``reading``: how the stage reads its images (``data.build.image_reading_of``); the probe's are read alike.
        ``num_workers``: processes decoding the probe images ahead at each measurement (the trainer gives none: a probe
        of 64 images decodes in about 0.4 s on the main thread, less than starting workers each time)."""
        cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
        self.every = int(cfg.get("every") or 0)
        if self.every < 0:
            raise ValueError(f"monitor.every={self.every}; use 0 (off) or a positive number of steps")
        if not self.every:
            return
        self.reading, self.num_workers = reading, num_workers
        if not cfg.get("probe"):
            raise ValueError(
                "monitor.every > 0 needs monitor.probe: a caption file (image + caption records), "
                "e.g. monitor.probe=${data_root}/digits/test_captions.json"
            )
        self.probe = load_probe_set(str(cfg["probe"]), cfg.get("n"), cfg.get("image_root"))
        self.metrics = list(cfg.get("metrics") or ["modality_gap", "mutual_knn", "cka", "retrieval"])
        self.topk = int(cfg.get("topk", 10))
        self.batch_size = int(cfg.get("batch_size", 32))
        self.layers = resolve_layers(model, cfg.get("layers"), "monitor.layers")
        self.layer_metrics = cfg.get("layer_metrics")
        # at set-up, on the pairs the file gave: the config check compares monitor.n with topk only
        asked = set(self.metrics) | (set(self.layer_metrics or self.metrics) if self.layers else set())
        check_probe_size(len(self.probe.ids), self.topk, asked, "monitor", "monitor.probe", cfg["probe"], cfg.get("n"))
        self.last: float | None = None
        self.tower_features: torch.Tensor | None = None

    def start(self) -> None:
        """``time_share``'s clock starts with this process's training loop: a resumed run's first measurement has one."""
        self.last = time.perf_counter()

    @torch.no_grad()
    def frozen_tower_features(self, model: Any) -> torch.Tensor | None:
        """The tower's features of the probe images, computed once while the tower is frozen (most of the cost)."""
        if "vision" not in getattr(model, "frozen_parts", ()):
            return None
        if self.tower_features is None:
            images = self.probe.pixels(model.image_spec, self.reading)
            device = next(model.parameters()).device
            batches = image_batches(images, self.batch_size, device, self.num_workers)
            self.tower_features = torch.cat([model.vision(pixels).cpu() for pixels in batches])
        return self.tower_features

    def due(self, step: int) -> bool:
        return bool(self.every) and (step == 1 or step % self.every == 0)

    def __call__(self, step: int, model: Any) -> dict[str, float]:
        """``monitor/*`` metrics for this step when due, else an empty dict."""
        if not self.due(step):
            return {}
        wait_for_device(next(model.parameters()).device)
        t0 = time.perf_counter()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            try:  # the images are read at each measurement (a tower that trains sees them anew)
                tower = self.frozen_tower_features(model)
                tokens = needs_tokens(self.metrics)  # only the pooled table's A-score reads them
                feats = extract(
                    model, self.probe, self.batch_size, self.layers, tower, self.reading, tokens, self.num_workers
                )
            except DataError as e:  # an image gone or damaged since set-up: a diagnostic must not end the run
                logging.getLogger("alignlm").warning("monitor at step %d: %s; skipped", step, e)
                self.last = time.perf_counter()
                return {}
            kept = [feats.visual_mean, feats.text_mean, *(feats.a_scores or ())]  # on the device: one sync each
            tensors = kept + [t for pair in feats.layers.values() for t in pair]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                # the metrics refuse such features; a diagnostic must not end the run, nor log a made-up number
                logging.getLogger("alignlm").warning("monitor at step %d: probe features are not finite; skipped", step)
                self.last = time.perf_counter()
                return {}
            values = flat(probe_metrics(feats, self.metrics, self.topk, self.layer_metrics, encoder=False))
        values.pop("n", None)
        t1 = time.perf_counter()
        row = {f"monitor/{k}": v for k, v in sorted(values.items())}
        row["monitor/seconds"] = t1 - t0
        if self.last is not None:
            row["monitor/time_share"] = (t1 - t0) / max(t1 - self.last, 1e-9)
        self.last = t1
        return row
