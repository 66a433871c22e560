"""V2L (Zhu et al. 2024, "Beyond Text: Frozen Large Language Models in Visual Signal Comprehension"): a connector
that quantises visual features onto the frozen LLM's own vocabulary embeddings (``model/connector=v2l``)."""
