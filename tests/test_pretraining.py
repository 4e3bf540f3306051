"""The examples' pretraining cache (--pretrain-steps once per pretraining configuration) and the
convergence benchmark's ``adamw_layers`` optimizer (AdamW on BAdam's trainable set)."""

import dataclasses

import pytest

from examples import cli, finetune_llama, finetune_roberta, pretraining

ROBERTA = ["--steps", "30", "--batch-size", "4", "--seq-len", "24", "--hidden-size", "32",
           "--num-layers", "2", "--num-heads", "2", "--intermediate-size", "64",
           "--vocab-size", "300", "--max-examples", "80", "--pretrain-steps", "3"]


class _Tok:
  def __init__(self, vocab):
    self._vocab = vocab

  def get_vocab(self):
    return self._vocab


def test_cache_key_is_every_pretraining_option_and_nothing_else():
  from examples.models import roberta

  cfg = finetune_roberta.Config(pretrain_steps=100, steps=200)
  model = roberta.RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64)
  tok, texts = _Tok({"a": 0, "b": 1}), ["one text", "another"]
  key = lambda c=cfg, m=model, t=tok, x=texts: pretraining.cache_key(  # noqa: E731
      "roberta-mlm", c, m, t, x)[0]
  base = key()
  assert base.startswith("roberta-mlm-") and key() == base
  # Fine-tuning and run-folder options do not change the pretrained weights.
  for change in (dict(switch_every=3), dict(eval_every=7), dict(optimizer="adamw"),
                 dict(rank=4), dict(out="elsewhere"), dict(pretrain_cache="x"),
                 dict(log_every=1), dict(checkpoint_every=5), dict(lora_rank=2),
                 dict(always_active_head=False), dict(always_active="layers"),
                 dict(reset_always_active=False)):
    assert key(dataclasses.replace(cfg, **change)) == base, change
  # What the pretraining trains with does.
  for change in (dict(seed=1), dict(batch_size=8), dict(weight_decay=0.1), dict(clip_norm=0.5),
                 dict(warmup_steps=3), dict(steps=300), dict(seq_len=48),
                 dict(param_dtype="bfloat16")):
    assert key(dataclasses.replace(cfg, **change)) != base, change
  assert key(m=dataclasses.replace(model, hidden_size=64, num_attention_heads=2)) != base
  assert key(t=_Tok({"a": 1, "b": 0})) != base
  assert key(x=texts[:1]) != base


@pytest.mark.slow
def test_pretraining_runs_once_and_is_reused(tmp_path, capsys, monkeypatch):
  """A second task with the same pretraining options (another run folder, another fine-tuning
  option) loads the cached weights: no pretraining, the same encoder. Another pretraining seed
  pretrains again."""
  import jax
  import numpy as np

  from examples import training

  cache = ["--pretrain-cache", str(tmp_path / "cache")]
  cfg = cli.parse_config(finetune_roberta.Config,
                            ROBERTA + cache + ["--out", str(tmp_path / "a")], "")
  first = finetune_roberta.build_task(cfg).make_model()
  assert "pretraining with masked language modelling" in capsys.readouterr().out
  (folder,) = (tmp_path / "cache").glob("roberta-mlm-*")
  assert (folder / pretraining.WEIGHTS).is_file() and (folder / "pretraining.json").is_file()

  def no_training(*args, **kwargs):
    raise AssertionError("pretrained again")

  with monkeypatch.context() as m:
    m.setattr(training, "train", no_training)
    again = cli.parse_config(finetune_roberta.Config, ROBERTA + cache + [
        "--out", str(tmp_path / "b"), "--switch-every", "2", "--optimizer", "adamw"], "")
    second = finetune_roberta.build_task(again).make_model()
  assert "pretrained weights reused from" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(first.layers), jax.tree.leaves(second.layers), strict=True):
    np.testing.assert_array_equal(a, b)
  other = cli.parse_config(finetune_roberta.Config, ROBERTA + cache + [
      "--out", str(tmp_path / "c"), "--seed", "1"], "")
  finetune_roberta.build_task(other).make_model()
  assert len(list((tmp_path / "cache").glob("roberta-mlm-*/" + pretraining.WEIGHTS))) == 2


def test_adamw_layers_trains_what_badam_trains():
  """AdamW on BAdam's trainable set: the layers and the always-active task head move, the frozen
  embedding does not (and has no Adam state)."""
  import jax
  import jax.numpy as jnp

  from examples import optimizers, training

  params = {"embeddings": {"word_embeddings": {"embedding": jnp.ones((8, 4))}},
            "layers": {i: {"mlp": {"kernel": jnp.ones((4, 6))}} for i in range(2)},
            "classifier": {"dense": {"kernel": jnp.ones((4, 3))}}}
  task = training.Task("t", lambda: None, lambda m, b: None, {}, {}, head=("classifier",),
                       from_scratch=False)
  cfg = finetune_llama.Config(warmup_steps=0, steps=10, clip_norm=0.0)
  tx = optimizers.make_optimizer(cfg, "adamw_layers", params, task)
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  moved = {k: float(sum(jnp.abs(u).sum() for u in jax.tree.leaves(v))) > 0
           for k, v in updates.items()}
  assert moved == {"embeddings": False, "layers": True, "classifier": True}
  state_size = sum(x.size for x in jax.tree.leaves(state))
  full = optimizers.make_optimizer(cfg, "adamw", params, task)
  assert state_size < sum(x.size for x in jax.tree.leaves(full.init(params)))
