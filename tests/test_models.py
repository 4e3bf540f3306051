"""The NNX Llama and RoBERTa against logits of the transformers PyTorch models (tests/fixtures)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.models import llama, roberta

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MODELS = {"llama": llama.Llama, "llama_tied": llama.Llama, "roberta": roberta.Roberta}


def _reference(name):
  ref = np.load(FIXTURES / name / "reference.npz")
  return ref["input_ids"], ref["attention_mask"], ref["logits"]


@nnx.jit
def _forward(model, ids, mask):
  return model(ids, mask)


def _logits(model, ids, mask):
  return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))


def _check(name, logits, ref, mask, atol=2e-4):
  if name.startswith("llama"):  # padded positions are garbage in both; compare real tokens only
    np.testing.assert_allclose(logits[mask == 1], ref[mask == 1], atol=atol, rtol=1e-4)
  else:
    np.testing.assert_allclose(logits, ref, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_transformers(name):
  ids, mask, ref = _reference(name)
  model = MODELS[name].load_pretrained(FIXTURES / name)
  assert np.abs(ref).max() > 0.5  # the fixture's logits are not trivially small
  _check(name, _logits(model, ids, mask), ref, mask)


@pytest.mark.parametrize("name", ["llama", "roberta"])
@pytest.mark.parametrize("options", [dict(remat=True), dict(scan_layers=True, remat=True)])
def test_remat_and_scan_variants(name, options):
  ids, mask, ref = _reference(name)
  model = MODELS[name].load_pretrained(FIXTURES / name, **options)
  _check(name, _logits(model, ids, mask), ref, mask)

  def loss(m):
    return jnp.mean(m(jnp.asarray(ids), jnp.asarray(mask)) ** 2)

  grads = nnx.jit(nnx.grad(loss))(model)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("scan", [False, True])
def test_save_load_round_trip(name, scan, tmp_path):
  ids, mask, ref = _reference(name)
  model = MODELS[name].load_pretrained(FIXTURES / name, scan_layers=scan)
  model.save_pretrained(tmp_path)
  again = MODELS[name].load_pretrained(tmp_path)
  _check(name, _logits(again, ids, mask), ref, mask)
  if scan:
    return
  a = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  b = nnx.to_pure_dict(nnx.state(again, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_param_paths_have_one_subtree_per_layer():
  model = llama.Llama.load_pretrained(FIXTURES / "llama")
  paths = {jax.tree_util.keystr(p, simple=True, separator=".")
           for p, _ in jax.tree_util.tree_leaves_with_path(
               nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
  assert "layers.1.mlp.gate_proj.kernel" in paths
  assert "embed_tokens.embedding" in paths and "lm_head.kernel" in paths


@pytest.mark.parametrize("name", ["llama", "roberta"])
def test_bf16_params(name):
  ids, mask, ref = _reference(name)
  model = MODELS[name].load_pretrained(FIXTURES / name, param_dtype="bfloat16", dtype="bfloat16")
  layer = model.layers[0]
  kernel = layer.mlp.gate_proj.kernel if name == "llama" else layer.output.kernel
  assert kernel.dtype == jnp.bfloat16
  logits = _logits(model, ids, mask)
  assert logits.dtype == np.float32 and np.isfinite(logits).all()
  _check(name, logits, ref, mask, atol=0.15 * np.abs(ref).max())


def test_llama_generate_is_greedy():
  model = llama.Llama.load_pretrained(FIXTURES / "llama")
  prompt = [5, 6, 7]
  out = llama.generate(model, prompt, 4)
  logits = model(jnp.asarray([prompt + out[:2]]))[0]
  assert int(jnp.argmax(logits[-1])) == out[2]


def test_roberta_new_head_for_other_label_count():
  ids, mask, _ = _reference("roberta")
  model = roberta.Roberta.load_pretrained(FIXTURES / "roberta", num_labels=5)
  assert _logits(model, ids, mask).shape == (2, 5)


def test_bad_checkpoints(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    llama.Llama.load_pretrained(tmp_path)
  with pytest.raises(ValueError, match="'roberta' model"):
    llama.Llama.load_pretrained(FIXTURES / "roberta")
  with pytest.raises(ValueError, match="'llama' model"):
    roberta.Roberta.load_pretrained(FIXTURES / "llama")
