"""Names every layer agrees on: the label ignored by the loss and the image placeholder token."""

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
