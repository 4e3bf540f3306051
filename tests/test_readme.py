"""The README's Python code blocks run as written, each on its own (no names from elsewhere)."""

import pathlib
import re

import jax
import numpy as np
import pytest

import optax_memopt

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _run(snippet: str) -> dict:
  scope: dict = {"__name__": "readme"}
  exec(compile(snippet, str(README), "exec"), scope)  # noqa: S102 - our own README
  return scope


def test_the_readme_has_python_blocks():
  assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs_as_written(index):
  scope = _run(BLOCKS[index])
  for name in ("loss", "x"):
    if name in scope:
      assert np.all(np.isfinite(np.asarray(scope[name]))), name


def test_usage_snippet_trains_one_block():
  (snippet,) = re.findall(r"## Usage\n\n```python\n(.*?)```", README.read_text(), re.S)
  scope = _run(snippet)
  p, s, step = scope["params"], scope["opt_state"], scope["step"]
  before = jax.tree.map(np.asarray, p)  # the block step donates the params it is given
  for _ in range(3):  # a few more block steps: only the active block moves
    p, s, loss = step(p, s, scope["batch"])
  assert np.isfinite(float(loss))
  changed = [not np.array_equal(a["w"], b["w"]) for a, b in zip(p["layers"], before["layers"])]
  assert sum(changed) == 1
  assert optax_memopt.active_block(s) == changed.index(True)
  ranks = optax_memopt.effective_ranks(scope["tx"].init(before))
  assert sorted(ranks) == ["layers.0.w", "layers.1.w", "layers.2.w"]
