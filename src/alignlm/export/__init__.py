"""Leaving alignlm: export to transformers' ``LlavaForConditionalGeneration`` (and importing from it)."""
