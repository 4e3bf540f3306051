"""Toy models and data shared by the test files (import as ``from tests import _models``).

Each builder is deterministic in its arguments, so two files that build the same model get the
same numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.models import base

WIDTH = 8
VOCAB = 11
# A batch of token ids for ``toy_lm_loss``.
BATCH = jnp.arange(6) % VOCAB


def toy_lm_params(n_layers=4, width=WIDTH, dtype=jnp.float32, seed=0):
  """A small language-model-shaped parameter dict: embedding, a list of layers, norm and head.

  ``dtype`` may be a dtype for every leaf or ``"mixed"``: bfloat16 norms and head, the other
  matrices float32.
  """
  mixed = isinstance(dtype, str) and dtype == "mixed"
  dtype, vec_dtype = (jnp.float32, jnp.bfloat16) if mixed else (dtype, dtype)
  keys = iter(jax.random.split(jax.random.key(seed), 8 * n_layers + 4))
  normal = lambda shape: (jax.random.normal(next(keys), shape) / np.sqrt(shape[0])).astype(dtype)
  return {
      "embed": normal((VOCAB, width)),
      "layers": [
          {
              "attn": {"q": normal((width, width)), "o": normal((width, width))},
              "mlp": {"up": normal((width, 2 * width)), "down": normal((2 * width, width))},
              "norm": jnp.ones((width,), vec_dtype),
          }
          for _ in range(n_layers)
      ],
      "final_norm": jnp.ones((width,), vec_dtype),
      "lm_head": normal((width, VOCAB)).astype(vec_dtype),
  }


def toy_lm_loss(params, x):
  """Next-token-like loss of ``toy_lm_params`` on token ids ``x``."""
  h = params["embed"][x]
  for layer in params["layers"]:
    a = jnp.tanh(h @ layer["attn"]["q"]) @ layer["attn"]["o"]
    h = h + a * layer["norm"]
    h = h + jnp.tanh(h @ layer["mlp"]["up"]) @ layer["mlp"]["down"]
  h = h * params["final_norm"]
  logits = (h @ params["lm_head"]).astype(jnp.float32)
  return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


def state_bytes(state):
  """Bytes held by the arrays of a pytree (an optimizer state)."""
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(state))


def spectral_grads(params, seed=1, rank=3):
  """Gradient-like arrays with the decaying spectrum of real gradients: for each matrix a rank-``rank``
  product with singular values halving, plus 1% noise; other leaves are normal noise.

  With a flat spectrum the leading subspace a low-rank projection finds would hinge on float32
  rounding, so two computation paths could not be compared.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = iter(jax.random.split(jax.random.key(seed), 3 * len(leaves)))

  def one(x):
    noise = 0.01 * jax.random.normal(next(keys), x.shape)
    if x.ndim != 2:
      return (jax.random.normal(next(keys), x.shape) + noise).astype(x.dtype)
    u = jax.random.normal(next(keys), (x.shape[0], rank))
    v = jax.random.normal(next(keys), (rank, x.shape[1]))
    return ((u * 0.5 ** jnp.arange(rank)) @ v + noise).astype(x.dtype)

  return treedef.unflatten([one(x) for x in leaves])



class DropoutLayer(nnx.Module):
  """An NNX residual layer ``x + dropout(tanh(linear(x)))``, dropout rate 0.5."""

  def __init__(self, width, rngs):
    self.linear = nnx.Linear(width, width, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return x + self.dropout(jnp.tanh(self.linear(x)))


class DropoutModel(nnx.Module):
  """A tiny NNX language model with dropout in every layer: embedding, ``DropoutLayer`` layers (a
  list, or a stack scanned by ``examples.models.base.apply_layers``) and a linear head."""

  def __init__(self, vocab, width, n_layers, scan, rngs):
    self.scan = scan
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.layers = base.make_layers(lambda r: DropoutLayer(width, r), n_layers, rngs, scan)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, ids):
    return self.head(base.apply_layers(self.layers, self.embed(ids), scan=self.scan, remat=False))


def mlp_params(n_layers, width, vocab, stacked=False, seed=0):
  """Embedding, residual MLP layers ``{"up", "down", "scale"}`` and a head: the layers a list, or
  with ``stacked`` the same numbers as one ``[n_layers, ...]`` stack (for ``scan_layers``)."""
  keys = iter(jax.random.split(jax.random.key(seed), 3 * n_layers + 2))
  normal = lambda shape: jax.random.normal(next(keys), shape) / np.sqrt(shape[-2])
  layers = [{"up": normal((width, 2 * width)), "down": normal((2 * width, width)),
             "scale": jnp.ones((width,))} for _ in range(n_layers)]
  if stacked:
    layers = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {"embed": normal((vocab, width)), "layers": layers, "head": normal((width, vocab))}


def mlp_layer(layer, h):
  """One layer of ``mlp_params``."""
  return h + jnp.tanh(h @ layer["up"]) @ layer["down"] * layer["scale"]
