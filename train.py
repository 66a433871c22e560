"""Shim so ``accelerate launch train.py +exp=sea`` equals ``alignlm train +exp=sea``."""

import sys

from alignlm.commands import console

if __name__ == "__main__":
    sys.exit(console(["train", *sys.argv[1:]]))
