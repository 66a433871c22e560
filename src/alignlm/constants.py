"""Names every layer agrees on: the label ignored by the loss, the image placeholder the data pipeline inserts, and the
answer length every command generates by default."""

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
# alignlm eval's (configs/eval/default.yaml) and the run's final evaluation's (train.yaml's eval.max_new_tokens) say
# the same (tests/test_eval_knobs.py); export --check and the lmms-eval task had 16, so one checkpoint read another
# accuracy from each
MAX_NEW_TOKENS = 8
