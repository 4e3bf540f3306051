"""Test configuration: offline, 8 simulated CPU devices for the sharding tests, and a persistent JAX
compilation cache for each test process."""

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The tests' models are tiny: compiling them takes longer than running them. XLA's backend (LLVM)
# optimisation level 0 compiles them faster; XLA's own graph passes (fusion, layout, sharding) are
# the same as at the default level, and a program computes the same way in every process of the
# session, so the tests' exact comparisons (resumed runs, two steps of one program) are unaffected.
# Set before JAX initialises its CPU backend; a flag the user gave wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# Must happen before JAX initialises its backends; harmless for the single-device tests.
jax.config.update("jax_num_cpu_devices", 8)

# Many tests compile the same computation through different jit objects (a fresh optimizer, an
# example run in another test, the same toy model in another test). A persistent cache, keyed by the
# compiled program, lets a process reuse the executable instead of compiling it again. The process
# that starts the session makes a directory and removes it at the end; each pytest-xdist worker
# (which inherits it through the environment) keeps its own cache in it, so no two processes write
# the same files. A cache hit returns the same executable (its memory and cost analyses included);
# tracing, and so every trace count a test asserts, is unchanged.
_CACHE_ENV = "OPTAX_MEMOPT_TEST_JAX_CACHE"
_OWN_CACHE = False
if jax.config.jax_compilation_cache_dir is None:  # a cache the user set up is left alone
  _OWN_CACHE = _CACHE_ENV not in os.environ
  if _OWN_CACHE:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="optax_memopt_jax_cache_")
  _worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ[_CACHE_ENV], _worker))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)
