"""WCA (Li et al. 2024, "Visual-Text Cross Alignment: Refining the Similarity Score in Vision-Language Models"):
training-free zero-shot scores for dual encoders from local crops against several descriptions per class."""
