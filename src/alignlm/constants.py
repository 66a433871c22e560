"""Names every layer agrees on: the label ignored by the loss and the placeholder tokens the data pipeline inserts."""

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
ALIGN_TOKEN = "<align>"  # AlignGPT's level slot, added to the tokenizer only by models with align_levels
