"""``python -m alignlm.commands ...`` equals ``alignlm ...`` (how spawned ranks and ``accelerate launch -m`` start it)."""

import sys

from alignlm.commands import console

sys.exit(console())
