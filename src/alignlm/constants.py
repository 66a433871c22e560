"""Names every layer agrees on: the label ignored by the loss and the image placeholder the data pipeline inserts."""

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
