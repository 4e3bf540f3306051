"""Regenerates the tiny Hugging Face checkpoints and reference logits in tests/fixtures/.

Needs PyTorch (only this script does): ``pip install torch``, then
``python examples/make_fixtures.py``. Each fixture is a directory with ``config.json`` and
``model.safetensors`` written by transformers' ``save_pretrained``, plus ``reference.npz`` holding
``input_ids``, ``attention_mask`` and the PyTorch model's float32 ``logits`` for them.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def _inputs(rng: np.random.Generator, vocab: int, pad_id: int, low: int = 3):
  ids = rng.integers(low, vocab, size=(2, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0  # right padding on the second row
  ids[1, 6:] = pad_id
  return ids, mask


def main() -> None:
  import torch
  import transformers

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=FIXTURES)
  out = parser.parse_args().out
  torch.manual_seed(0)
  rng = np.random.default_rng(0)

  llama_common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  llamas = {
      "llama": transformers.LlamaConfig(**llama_common, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default",
                                                         "rope_theta": 10000.0}),
      "llama_tied": transformers.LlamaConfig(
          **llama_common, tie_word_embeddings=True,
          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 16}),
  }
  for name, config in llamas.items():
    model = transformers.LlamaForCausalLM(config).eval()
    _randomize(model)
    ids, mask = _inputs(rng, config.vocab_size, config.pad_token_id)
    with torch.no_grad():
      logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    _save(out / name, model, ids, mask, logits.numpy())

  config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=40, num_labels=3)
  model = transformers.RobertaForSequenceClassification(config).eval()
  _randomize(model)
  ids, mask = _inputs(rng, config.vocab_size, config.pad_token_id)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  _save(out / "roberta", model, ids, mask, logits.numpy())


def _randomize(model) -> None:
  """Larger-than-init random weights, so that the logits (and any mismatch) are far from zero."""
  import torch

  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))


def _save(path: pathlib.Path, model, ids, mask, logits) -> None:
  model.save_pretrained(str(path))
  np.savez(path / "reference.npz", input_ids=ids.astype(np.int32),
           attention_mask=mask.astype(np.int32), logits=logits.astype(np.float32))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
