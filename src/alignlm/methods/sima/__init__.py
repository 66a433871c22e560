"""SIMA (Wang et al. 2024, "Enhancing Visual-Language Modality Alignment in Large Vision Language Models via
Self-Improvement"): the model answers its own training questions, judges pairs of its answers in context against the
reference answer with three visual criteria, and learns from its judgements by preference tuning (the dpo stage)."""
