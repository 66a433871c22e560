"""The artifact probe on the demo's vision tower (docs/experiments/artifacts.md): per EfficientNet-Lite0 block and its
output, the share of patch tokens over several multiples of their image's median norm, on held-out images.

    python experiments/artifacts/probe.py --sets data/shapes/test_captions.json data/digits/test_captions.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from alignlm.config import compose, instantiate
from alignlm.models.artifacts import artifact_report
from alignlm.models.probes import load_probe_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", required=True, help="caption files whose images to probe")
    ap.add_argument("--n", type=int, default=200, help="images per set")
    ap.add_argument("--factors", type=float, nargs="+", default=[4.0, 2.0, 1.5])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    tower = instantiate(compose(["model=demo"]).model.vision, "model.vision").eval()
    report = {}
    for path in args.sets:
        pixels = load_probe_set(path, args.n).pixels(tower.image_spec)[:]  # decoded once for every factor
        name = Path(path).parent.name
        report[name] = {f: artifact_report(tower, pixels.split(32), f) for f in args.factors}
        layers = list(report[name][args.factors[0]])
        print(f"\n{name}: {len(pixels)} images; outlier share % at " + ", ".join(f"{f:g}x" for f in args.factors))
        print("| layer | max / median norm | " + " | ".join(f"> {f:g}x %" for f in args.factors) + " |")
        print("|---|---:|" + "---:|" * len(args.factors))
        for layer in layers:
            cells = [f"{100 * report[name][f][layer]['outlier_share']:.2f}" for f in args.factors]
            ratio = report[name][args.factors[0]][layer]["max_ratio"]
            print(f"| {layer} | {ratio:.2f} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
