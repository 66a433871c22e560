"""Does an exported folder answer as its checkpoint does? Both sides answer one question set, greedily.

``alignlm export FINAL OUT --check SET`` runs this after writing ``OUT``. alignlm's side is ``alignlm eval``'s path
(the checkpoint rebuilt, the record rendered with the training template); the export's side is what lmms-eval's
``llava_hf`` does: ``LlavaForConditionalGeneration`` and ``AutoProcessor`` from the folder, the question (the record's
first user turn without ``<image>``) as ``[image, text]`` chat content through the exported chat template, and
``generate`` to the exported stop tokens. A difference in prompt, preprocessing, weights or stop shows up as answers
that differ; the report lists the first few.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from alignlm.constants import MAX_NEW_TOKENS
from alignlm.data.build import image_reading_of
from alignlm.data.images import PADDED, ImageReading, load_rgb
from alignlm.data.records import image_paths, read_records
from alignlm.evaluation.checkpoints import data_config, load, resolve, stage_config
from alignlm.evaluation.evaluate import check_answers, scored
from alignlm.evaluation.lmms import question_of
from alignlm.models.generation import generate_set

N_SHOWN = 5


@torch.no_grad()
def exported_answers(
    out_dir: str | Path,
    records: list[dict[str, Any]],
    root: Path,
    max_new_tokens: int,
    device: torch.device,
    reading: ImageReading = PADDED,
) -> list[str]:
    """Greedy answers of the exported folder, one question at a time, as lmms-eval's ``llava_hf`` asks them, on
    ``device`` (alignlm's side's: both sides answer on one device, in the dtypes they load in). Each image is read as
    alignlm's side read it (``reading``: the checkpoint's stage's; with the default limit and a padded square, a tall
    image a cropping stage had read was refused here)."""
    processor = AutoProcessor.from_pretrained(out_dir)
    model = LlavaForConditionalGeneration.from_pretrained(out_dir).eval().to(device)
    answers = []
    for record in records:
        paths = image_paths(record, root)  # inside the root: alignlm's side read the same records with the checks on
        if len(paths) != 1:
            raise ValueError(f"export check: record {record.get('id')!r} has {len(paths)} images; it compares one")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question_of(record)}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        # as alignlm's side reads it: raster formats only, upright, on white, within its stage's limit
        image = load_rgb(paths[0], reading.max_pixels, reading.aspect_ratio == "pad")
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
        new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ]
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


def compare_with_export(
    checkpoint: str | Path,
    out_dir: str | Path,
    questions: str | Path,
    limit: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    allow_code: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Both sides' answers on the first ``limit`` questions: agreement, each side's accuracy, the first differences.
    Both run on ``device``, one after the other: alignlm's model is let go before the export's is loaded."""
    asked = read_records(str(questions))[:limit]
    if asked and all(isinstance(r, dict) and "answer" in r for r in asked):  # scored: refused before any generation
        check_answers(Path(questions).name, str(questions), limit)
    ck = resolve([str(checkpoint)])[-1]
    model = load(ck, allow_code, trust_remote_code).to(device)  # load leaves it on the CPU
    data_cfg = data_config(ck, stage_config(ck))
    ours = generate_set(model, str(questions), data_cfg, max_new_tokens=max_new_tokens, limit=limit)
    del model
    records = [rec for _, _, rec in ours]
    root, reading = Path(questions).resolve().parent, image_reading_of(data_cfg)
    theirs = exported_answers(out_dir, records, root, max_new_tokens, torch.device(device), reading)
    differ = [
        {"id": rid, "alignlm": pred, "export": other, "answer": rec.get("answer")}
        for (rid, pred, rec), other in zip(ours, theirs)
        if pred != other
    ]
    n = len(records)
    answered = all("answer" in rec for rec in records)
    return {
        "set": str(questions),
        "n": n,
        "same_answers": n - len(differ),
        "max_new_tokens": max_new_tokens,
        # scored as alignlm eval scores them, meta.choices included (a letter answer of option texts by its letter)
        "alignlm_accuracy": sum(scored(p, r)[0] for _, p, r in ours) / max(n, 1) if answered else None,
        "export_accuracy": sum(scored(t, r)[0] for t, r in zip(theirs, records)) / max(n, 1) if answered else None,
        "differences": differ[:N_SHOWN],
    }


def format_check(result: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [f"export check on {result['set']}: {result['same_answers']} of {result['n']} answers identical"]
    if result["alignlm_accuracy"] is not None:
        lines.append(
            f"  accuracy: alignlm {100 * result['alignlm_accuracy']:.1f} %, "
            f"exported folder (transformers generate) {100 * result['export_accuracy']:.1f} % "
            f"(answers of at most {result['max_new_tokens']} tokens)"
        )
    lines += [f"  differs: {json.dumps(d)}" for d in result["differences"]]
    return "\n".join(lines)
