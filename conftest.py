"""Test configuration: offline, 8 simulated CPU devices for the sharding tests."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

# Must happen before JAX initialises its backends; harmless for the single-device tests.
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent JAX compilation cache for one module: its runs compile the same steps, so the
  end-to-end runs of the examples and benchmarks reuse them (saves most of their time)."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  yield
  for n, v in before.items():
    jax.config.update(n, v)
