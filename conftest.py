"""Test configuration: offline, 8 simulated CPU devices for the sharding tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

# Must happen before JAX initialises its backends; harmless for the single-device tests.
jax.config.update("jax_num_cpu_devices", 8)
