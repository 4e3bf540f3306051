"""examples/training.py: the train steps hand back the state the forward pass writes (dropout)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_memopt
from examples import config, training
from tests import _models

VOCAB, WIDTH, LAYERS = 16, 8, 3


def _Model(scan, rngs):
  """A tiny model with dropout in every layer; its layers a list or a scanned stack."""
  return _models.DropoutModel(VOCAB, WIDTH, LAYERS, scan, rngs)


def _loss(model, batch):
  logits = model(batch["input_ids"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, (batch["input_ids"] + 1) % VOCAB)
  return jnp.mean(nll), {"nll_sum": jnp.sum(nll), "count": jnp.float32(nll.size)}


BATCH = {"input_ids": (jnp.arange(4 * 6).reshape(4, 6) * 5) % VOCAB}


@pytest.mark.parametrize("optimizer,layerwise", [("adamw", False), ("badam", False), ("adamw", True)],
                         ids=["plain", "block", "layerwise"])
def test_dropout_masks_change_from_step_to_step(optimizer, layerwise):
  # Before: the step returned no rest, so the loop passed the same RNG counts every step and
  # dropout drew the same masks (with a zero learning rate, the same loss every step).
  split = training.Trainable(_Model(True, nnx.Rngs(0)), nnx.Param)
  tx = optax_memopt.badam(0.0, switch_every=2) if optimizer == "badam" else optax.adam(0.0)
  train_step, _ = training.make_steps(split, _loss, tx, optimizer, layerwise=layerwise)
  params, rest, opt_state = split.params, split.rest, tx.init(split.params)
  losses = []
  for _ in range(3):
    params, opt_state, rest, (loss, _) = train_step(params, opt_state, rest, BATCH)
    losses.append(float(loss))
  assert len(set(losses)) == 3, losses
  counts = [x for x in jax.tree.leaves(rest.written) if jnp.issubdtype(x.dtype, jnp.integer)]
  assert counts and all(int(jnp.min(c)) == 3 for c in counts)  # one draw per step and layer


def _task():
  rows = {"input_ids": np.asarray(BATCH["input_ids"].repeat(2, axis=0)),
          "weight": np.ones(8, np.float32)}
  return training.Task(name="dropout", make_model=lambda: _Model(True, nnx.Rngs(0)), loss_fn=_loss,
                       train_data=rows, eval_data=rows, tokens_key="input_ids")


def _cfg(**kw):
  return config.TrainConfig(optimizer="adamw", learning_rate=1e-2, warmup_steps=0, steps=4,
                            batch_size=4, eval_every=100, log_every=1, checkpoint_every=2,
                            **kw)


def test_resume_with_dropout_is_exact(tmp_path):
  # The RNG counts are checkpointed: the resumed steps draw the masks the whole run drew (restored
  # at their initial value, steps 3-4 would repeat the masks of steps 1-2).
  training.train(_cfg(), _task(), "adamw", tmp_path / "whole")
  training.train(_cfg(stop_at=2), _task(), "adamw", tmp_path / "split")
  training.train(_cfg(resume=True), _task(), "adamw", tmp_path / "split")

  def losses(run):
    records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}

  whole, split = losses("whole"), losses("split")
  assert sorted(whole) == sorted(split) == [1, 2, 3, 4]
  assert whole == split
