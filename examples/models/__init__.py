"""Compact Flax NNX models that load and save Hugging Face checkpoints."""
