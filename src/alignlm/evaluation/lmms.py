"""Run lmms-eval on an exported alignlm model: ``accelerate launch -m alignlm.evaluation.lmms --model llava_hf ...``.

The same arguments as ``lmms-eval``; first it removes one incompatibility between lmms-eval (<= 0.7.3) and
transformers 5: lmms-eval's ``llava_hf`` passes ``image_sizes`` to ``generate``, and transformers 5's Llava then splits
image features Pixtral-style with ``vision_tower.patch_size``, which CLIP and SigLIP towers lack. Those towers take
fixed-size images, so the argument carries nothing for them and is dropped; any other tower receives it unchanged.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence


def drop_unused_image_sizes() -> None:
    """Make ``LlavaForConditionalGeneration.generate`` ignore ``image_sizes`` for towers without a patch size."""
    from transformers import LlavaForConditionalGeneration

    original = LlavaForConditionalGeneration.generate
    if getattr(original, "_alignlm_drops_image_sizes", False):
        return

    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        tower = getattr(getattr(self, "model", self), "vision_tower", None)
        if kwargs.get("image_sizes") is not None and getattr(tower, "patch_size", None) is None:
            kwargs.pop("image_sizes")
        return original(self, *args, **kwargs)

    generate._alignlm_drops_image_sizes = True  # type: ignore[attr-defined]
    LlavaForConditionalGeneration.generate = generate


def main(argv: Sequence[str] | None = None) -> None:
    """lmms-eval's own command line, after the fix above."""
    try:
        from lmms_eval.cli.dispatch import main as lmms_main
    except ImportError as e:
        raise SystemExit(f"lmms-eval is not installed here ({e}); pip install lmms-eval") from e
    drop_unused_image_sizes()
    sys.argv = ["lmms-eval", *(sys.argv[1:] if argv is None else argv)]
    lmms_main()


if __name__ == "__main__":
    main()
