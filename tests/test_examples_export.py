"""Exporting a model as a Hugging Face checkpoint, checked through transformers.

transformers 5 has no Flax models and its PyTorch models need torch, which this project does not
install. So the round trip is: a fixture written by transformers' own ``save_pretrained`` (from
the PyTorch model, ``examples/make_fixtures.py``) → our loader → ``export_hf`` → transformers'
``AutoConfig`` and ``AutoTokenizer`` load the export; the weight file holds exactly the tensor
names, shapes, dtypes and values transformers wrote; and the export, reloaded, gives the PyTorch
model's logits (``reference.npz``).
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from examples import checkpoints, data, lora
from examples.models import llama, roberta

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MODELS = {"llama": llama.Llama, "llama_tied": llama.Llama, "roberta": roberta.Roberta}
TEXTS = ["def f(x): return x + 1", "class A: pass", "while True: break"] * 10


def _tokenizer(tmp_path, name):
  if name == "roberta":
    return data.bpe_tokenizer(TEXTS, tmp_path / "tok.json", vocab_size=300,
                              special=("<s>", "<pad>", "</s>", "<unk>", "<mask>"), bos="<s>",
                              eos="</s>", pad="<pad>", single="<s> $A </s>",
                              pair="<s> $A </s> </s> $B </s>", unk_token="<unk>",
                              mask_token="<mask>")
  return data.bpe_tokenizer(TEXTS, tmp_path / "tok.json", vocab_size=300,
                            special=("<pad>", "<s>", "</s>"), bos="<s>", eos="</s>", pad="<pad>",
                            single="<s> $A", pair="<s> $A $B")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_round_trip_through_transformers(name, tmp_path):
  from transformers import AutoConfig, AutoTokenizer

  model = MODELS[name].load_pretrained(FIXTURES / name)
  tok = _tokenizer(tmp_path, name)
  labels = ["no", "maybe", "yes"] if name == "roberta" else None
  export = tmp_path / "export"
  checkpoints.export_hf(model, tok, export, labels=labels)

  # Config: what transformers reads back is the fixture's architecture.
  ours, theirs = (AutoConfig.from_pretrained(d, local_files_only=True)
                  for d in (export, FIXTURES / name))
  assert ours.model_type == theirs.model_type and ours.architectures == theirs.architectures
  for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "tie_word_embeddings"):
    assert getattr(ours, key) == getattr(theirs, key), key
  if name == "roberta":
    assert ours.id2label == {0: "no", 1: "maybe", 2: "yes"} and ours.num_labels == 3

  # Tokenizer: transformers encodes as the run did, with the model's special tokens around it.
  hf_tok = AutoTokenizer.from_pretrained(export, local_files_only=True)
  ids = tok.encode("def g(y): return y")
  expected = [tok.bos_id] + ids + ([tok.eos_id] if name == "roberta" else [])
  assert hf_tok("def g(y): return y")["input_ids"] == expected
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
      tok.bos_id, tok.eos_id, tok.pad_id)

  # Weights: the names, shapes and dtypes transformers wrote for this architecture, same values.
  exported, reference = (load_file(str(d / "model.safetensors")) for d in (export, FIXTURES / name))
  assert sorted(exported) == sorted(reference)
  for key, value in reference.items():
    assert exported[key].shape == value.shape and exported[key].dtype == value.dtype, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)

  # Logits: the export, reloaded, against the PyTorch model's (same tolerance as test_models.py).
  ref = np.load(FIXTURES / name / "reference.npz")
  again = MODELS[name].load_pretrained(export)
  logits = np.asarray(again(jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"])))
  real = ref["attention_mask"] == 1 if name.startswith("llama") else slice(None)
  np.testing.assert_allclose(logits[real], ref["logits"][real], atol=2e-4, rtol=1e-4)


def test_merge_lora_keeps_the_function_and_the_checkpoint_layout(tmp_path):
  """A LoRA-trained model exports as the plain architecture with ``kernel + lora_a @ lora_b``."""
  model = llama.Llama.load_pretrained(FIXTURES / "llama")
  ref = np.load(FIXTURES / "llama" / "reference.npz")
  ids, mask = jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"])
  rngs = nnx.Rngs(3)
  for layer in model.layers:
    lora.apply_lora(layer, 4, rngs)
  for _, p in nnx.iter_graph(model):  # lora_b starts at 0: make the adapters do something
    if isinstance(p, nnx.LoRAParam) and p[...].shape[0] == 4:
      p[...] = 0.3 * jnp.ones_like(p[...])
  plain = np.asarray(llama.Llama.load_pretrained(FIXTURES / "llama")(ids, mask))
  adapted = np.asarray(model(ids, mask))
  assert np.abs(adapted - plain).max() > 1.0  # the adapters change the logits
  checkpoints.export_hf(model, None, tmp_path)
  assert not any(isinstance(p, nnx.LoRAParam) for _, p in nnx.iter_graph(model))
  again = llama.Llama.load_pretrained(tmp_path)
  # float32: x @ (W + A B) vs x @ W + (x @ A) @ B differ by summation order only.
  np.testing.assert_allclose(np.asarray(again(ids, mask)), adapted, atol=1e-3, rtol=1e-4)
  assert sorted(load_file(str(tmp_path / "model.safetensors"))) == sorted(
      load_file(str(FIXTURES / "llama" / "model.safetensors")))
