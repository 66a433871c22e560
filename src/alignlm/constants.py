"""Names every layer agrees on: the label ignored by the loss, the image placeholder the data pipeline inserts, and the
answer length every command generates by default."""

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
# alignlm eval's (configs/eval/default.yaml) and the run's final evaluation's (train.yaml's eval.max_new_tokens) say
# the same (tests/test_eval_knobs.py); export --check and the lmms-eval task had 16, so one checkpoint read another
# accuracy from each
MAX_NEW_TOKENS = 8
# ``extra=`` of a warning that every rank of a run makes alike, from the config or the data every rank reads the same:
# rank 0 alone prints it (training/logging.py: get_logger), where a 64-rank job had printed each 64 times
ALIKE_ON_EVERY_RANK = {"alike_on_every_rank": True}
