"""Score a trained model on LLaVA-format question sets: greedy (or sampled) answers vs reference answers.

Each record carries ``answer`` and, optionally, ``meta.choices`` (all valid answers for its question type),
from which the chance level is computed, so every accuracy is printed next to what guessing would get.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader

from alignlm.data.build import build_dataset
from alignlm.data.collate import Collator
from alignlm.evaluation.answers import is_correct


@torch.no_grad()
def answer_accuracy(
    model: Any,
    name: str,
    path: str,
    data_cfg: Mapping[str, Any],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    limit: int | None = None,
    generation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Accuracy, chance level and a few examples for one question set."""
    cfg = {**dict(data_cfg), "sources": [{"path": path}], "on_error": "raise"}
    dataset = build_dataset(cfg, model, seed=0, for_generation=True)
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                        collate_fn=Collator(model.tokenizer.pad_token_id, padding_side="left"))
    device = next(model.parameters()).device
    model.eval()
    correct, chance, examples = 0, 0.0, []
    for batch in loader:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        new_tokens = model.generate(inputs, max_new_tokens=max_new_tokens, **dict(generation or {}))
        for pred_ids, answer, meta, rid in zip(new_tokens, batch["answer"], batch["meta"], batch["ids"]):
            pred = model.tokenizer.decode(pred_ids, skip_special_tokens=True).strip()
            ok = is_correct(pred, answer)
            correct += ok
            choices = (meta or {}).get("choices") or []
            chance += 1.0 / len(choices) if choices else 0.0
            if len(examples) < 5:
                examples.append({"id": rid, "prediction": pred, "answer": answer, "correct": ok})
    n = len(indices)
    return {"name": name, "n": n, "accuracy": correct / max(n, 1), "chance": chance / max(n, 1), "examples": examples}
