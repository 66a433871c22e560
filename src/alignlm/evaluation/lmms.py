"""Run lmms-eval on an exported alignlm model: ``alignlm lmms-eval --model llava_hf ...`` (or, several processes,
``accelerate launch -m alignlm.commands lmms-eval ...``).

The same arguments as ``lmms-eval``; first it removes one incompatibility between lmms-eval and transformers 5:
lmms-eval's simple ``llava_hf`` class (and its releases before 0.7) passes ``image_sizes`` to ``generate``, and
transformers 5's Llava then splits image features Pixtral-style with ``vision_tower.patch_size``, which CLIP and
SigLIP towers lack. Those towers take fixed-size images, so the argument carries nothing for them and is dropped; any
other tower receives it unchanged. (lmms-eval 0.7.3's default chat ``llava_hf`` does not pass it.)

``write_local_task`` turns a LLaVA-format question set (``.json`` or ``.jsonl``: the offline ``digits`` / ``shapes``
test sets, or any set whose records carry ``answer``) into an lmms-eval task folder for ``--include_path``: lmms-eval
tasks otherwise download their data from the Hugging Face Hub. Its images are read as ``alignlm eval`` reads them
(``data/images.py: load_rgb``: the common raster formats only, never a format Pillow hands to an external program;
upright, transparency on white), and an unreadable one is a ``DataError`` naming the file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import LlavaForConditionalGeneration

from alignlm.constants import IMAGE_TOKEN, MAX_NEW_TOKENS
from alignlm.data.records import image_paths, read_records, record_id
from alignlm.data.templates import to_turns
from alignlm.evaluation.answers import choice_texts, reference_answers
from alignlm.files import replace_text

# What to do without lmms-eval: not `pip install lmms-eval` into alignlm's venv, which breaks it (a CUDA torch over the
# CPU one, an antlr4 Hydra cannot use, a filelock lmms-eval itself cannot start with); scripts/eval_lmms.sh says it too
INSTALL_APART = (
    "install it in a virtualenv of its own, as docs/evaluation.md says (section 'lmms-eval (llava_hf)', "
    "'Install it in its own virtualenv'), activate that one and run this again there; a `pip install lmms-eval` into "
    "alignlm's own venv breaks it"
)

TASK_UTILS = '''"""lmms-eval task functions for a question set written by ``alignlm lmms-task``."""

from alignlm.data.images import load_rgb
from alignlm.evaluation.answers import score_answer


def doc_to_visual(doc):
    return [load_rgb(doc["image"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": score_answer(results[0], doc["answer"], doc["choices"])}
'''


def question_of(record: dict[str, Any]) -> str:
    """The record's one user turn without its image placeholder: the question an lmms-eval task asks. A record with
    several user turns or a system turn is refused: a task asks one bare question, where ``alignlm eval`` prompts with
    the record's history and system text, so the two would score different prompts."""
    turns = to_turns(record.get("conversations") or [])
    roles = [t.role for t in turns]
    if roles.count("user") != 1 or "system" in roles:
        raise ValueError(
            f"record id={record.get('id')!r} has turns {roles}: an lmms-eval task asks one question with no system text"
        )
    return next(t.content for t in turns if t.role == "user").replace(IMAGE_TOKEN, "").strip()


def write_local_task(questions: Path, out_dir: Path, name: str, max_new_tokens: int = MAX_NEW_TOKENS) -> Path:
    """Write ``out_dir/name/`` (task YAML, ``utils.py``, ``name.jsonl`` with absolute image paths); returns it.

    Each record's one image is the task's; a record with none or several is refused (the task shows one image per
    question), and a record without ``id`` is ``<file>#<index>``, as the data layer names it. Each record's first
    human turn, without its ``<image>`` placeholder, is the question; ``answer`` the reference
    (numbers written as text, so that every row has the same type) and ``meta.choices`` the choices, scored as
    ``alignlm eval`` scores them (normalised exact match, VQA accuracy for a list of answers, the picked letter on a
    question answered by letter). The set is read as ``alignlm eval`` reads it, ``.json`` or ``.jsonl``; every record
    is checked before a file is written, and each file is replaced whole, so a refused set leaves an earlier task as
    it was.
    """
    records = read_records(questions)
    task = Path(out_dir) / name
    root = Path(questions).resolve().parent
    rows = []
    for i, r in enumerate(records):  # every record checked before a file is written
        rid = record_id(r, questions, i)
        if "answer" not in r or "image" not in r:
            raise ValueError(f"{questions}: record {rid!r} needs 'image' and 'answer' to be a question")
        paths = image_paths(r, root)
        if len(paths) != 1:
            raise ValueError(f"{questions}: record {rid!r} has {len(paths)} images; an lmms-eval task shows one")
        try:
            refs = reference_answers(r["answer"])
            choices = choice_texts((r.get("meta") or {}).get("choices") or [])
        except ValueError as e:
            raise ValueError(f"{questions}: record {rid!r}: {e}") from e
        row = {
            "question_id": rid,
            "image": str(paths[0]),
            "question": question_of(r),
            "answer": refs if isinstance(r["answer"], list) else refs[0],
            "choices": choices,
        }
        rows.append(json.dumps(row) + "\n")
    task.mkdir(parents=True, exist_ok=True)
    replace_text(task / f"{name}.jsonl", "".join(rows))
    replace_text(task / "utils.py", TASK_UTILS)
    replace_text(
        task / f"{name}.yaml",
        f"# lmms-eval task over {Path(questions).resolve()} (written by alignlm lmms-task)\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {(task / f'{name}.jsonl').resolve()}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answer\n"
        f"generation_kwargs:\n  max_new_tokens: {max_new_tokens}\n  temperature: 0\n  do_sample: false\n  num_beams: 1\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n  - metric: accuracy\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  - version: 0.0\n",
    )
    return task


def drop_unused_image_sizes() -> None:
    """Make ``LlavaForConditionalGeneration.generate`` ignore ``image_sizes`` for towers without a patch size."""
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


def run_lmms_eval(argv: Sequence[str]) -> None:
    """lmms-eval's own command line with ``argv``, after the fix above."""
    try:
        from lmms_eval.cli.dispatch import main as lmms_main  # noqa: PLC0415 - optional, installed in its own venv
    except ImportError as e:
        raise SystemExit(f"lmms-eval is not installed here ({e}); {INSTALL_APART}") from e
    drop_unused_image_sizes()
    sys.argv = ["lmms-eval", *argv]
    lmms_main()
