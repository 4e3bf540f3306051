"""The README's usage snippet runs as written, on a small layered model."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

import optax_memopt

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_usage_snippet_runs():
  (snippet,) = re.findall(r"## Usage\n\n```python\n(.*?)```", README.read_text(), re.S)
  key = jax.random.key(0)
  params = {"layers": [{"w": 0.3 * jax.random.normal(jax.random.fold_in(key, i), (8, 8))}
                       for i in range(3)]}
  batch = jnp.ones((4, 8))

  def loss_fn(params, batch):
    x = batch
    for layer in params["layers"]:
      x = jnp.tanh(x @ layer["w"])
    return jnp.mean(x ** 2)

  before = jax.tree.map(np.asarray, params)  # the block step donates the params it is given
  scope = {"params": params, "loss_fn": loss_fn, "batch": batch}
  exec(compile(snippet, str(README), "exec"), scope)  # noqa: S102 - our own README
  # A few more block steps (the snippet's schedule starts at lr 0): only the active block moves.
  p, s = scope["params"], scope["opt_state"]
  for _ in range(3):
    p, s, loss = scope["step"](p, s, batch)
  assert np.isfinite(float(loss))
  scope["opt_state"] = s
  changed = [not np.array_equal(a["w"], b["w"]) for a, b in zip(p["layers"], before["layers"])]
  assert sum(changed) == 1
  assert optax_memopt.active_block(scope["opt_state"]) == changed.index(True)
  ranks = optax_memopt.effective_ranks(scope["tx"].init(before))
  assert sorted(ranks) == ["layers.0.w", "layers.1.w", "layers.2.w"]
