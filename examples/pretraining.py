"""Where a script's model starts when it is not random-init: a Hugging Face checkpoint
(``--model``, :func:`checkpoint_model`) or the ``--pretrain-steps`` stage, run once per
pretraining configuration and cached (:class:`PretrainedModel`).

The pretrained weights depend on the model's shape, the tokenizer, the pretraining texts and the
pretraining's training options (steps, seed, batch, learning rate, warmup, clipping, dtypes...),
and on nothing else. :func:`cache_key` hashes exactly those (every training option except the
ones listed in :data:`NOT_PRETRAINING`, which only steer the fine-tuning or the run folder), and
:func:`pretrained_state` keeps the pretrained weights in ``<--pretrain-cache>/<kind>-<hash>/``:
a second run with the same pretraining options (``--resume``, another optimizer, the convergence
benchmark's other runs) loads them instead of pretraining again. An interrupted pretraining
resumes from its own checkpoint in that folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Sequence
from typing import Any

from examples import config, data, errors

# TrainConfig fields that do not change the pretrained weights (fine-tuning and run-folder options).
NOT_PRETRAINING = frozenset({
    "name", "out", "resume", "overwrite", "compare", "export", "stop_at", "log_every",
    "eval_every", "checkpoint_every", "gen_tokens", "switch_every", "switch_mode", "update_ratio",
    "rank", "info_threshold", "min_rank", "refresh_threshold", "moment_transform",
    "galore_update_gap", "projection", "lora_rank", "pretrain_cache", "optimizer",
    "always_active_head", "always_active", "reset_always_active"})
WEIGHTS = "weights.npz"
# Part of every key: raise it when the pretraining code changes what it trains.
VERSION = 1


def _digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tok: Any) -> str:
  """A hash of the tokenizer's vocabulary and rules (the ids the model is trained on)."""
  raw = getattr(tok, "_tok", tok)
  text = raw.to_str() if hasattr(raw, "to_str") else json.dumps(sorted(raw.get_vocab().items()))
  return hashlib.sha256(text.encode()).hexdigest()


def cache_key(kind: str, pre_cfg: config.TrainConfig, model_cfg: Any, tok: Any,
              texts: Sequence[str]) -> tuple[str, dict]:
  """``(folder name, what it hashes)`` of a pretraining: ``kind`` (e.g. ``roberta-mlm``), the
  pretraining run's options, the model config, the tokenizer and the texts."""
  options = {k: v for k, v in dataclasses.asdict(pre_cfg).items() if k not in NOT_PRETRAINING}
  what = {"version": VERSION, "kind": kind, "options": options, "model": dataclasses.asdict(model_cfg),
          "tokenizer": tokenizer_fingerprint(tok), "texts": _digest(list(texts)),
          "num_texts": len(texts)}
  return f"{kind}-{_digest(what)[:16]}", what


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("OPTAX_MEMOPT_PRETRAIN_CACHE", "runs/pretrained"))


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[int(leaf) if leaf.isdigit() else leaf] = v
  return tree


def pretrained_state(kind: str, cfg: config.TrainConfig, pre_cfg: config.TrainConfig,
                     model_cfg: Any, tok: Any, texts: Sequence[str],
                     make_model: Callable[[], Any], pretrain_task: Callable[[Callable], Any],
                     cache_dir: str | pathlib.Path | None = None):
  """``(graphdef, state)`` of the pretrained model: from the cache, or pretrained and cached.

  ``make_model()`` builds the model before pretraining; ``pretrain_task(keep)`` returns the
  pretraining's :class:`examples.training.Task`, whose ``after_training`` calls ``keep(model)`` with
  the trained model. It is trained with AdamW in the cache folder's ``run``, resuming its checkpoint
  if an interrupted pretraining left one.
  """
  import jax
  import numpy as np
  from flax import nnx

  from examples import training

  name, what = cache_key(kind, pre_cfg, model_cfg, tok, texts)
  folder = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  folder = folder / name
  graphdef, state = nnx.split(nnx.eval_shape(make_model))
  weights = folder / WEIGHTS
  if weights.is_file():
    with np.load(weights) as f:
      flat = {k: f[k] for k in f.files}
    pure = nnx.to_pure_dict(state)
    loaded = _unflatten(flat)
    if jax.tree.structure(pure) != jax.tree.structure(loaded):
      raise errors.UsageError(f"{weights} does not hold this model's weights; delete {folder}")
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, loaded))
    print(f"pretrained weights reused from {folder} ({pre_cfg.steps} steps)")
    return graphdef, state
  kept: dict = {}
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "pretraining.json").write_text(json.dumps(what, indent=1, default=str))
  run_dir = folder / "run"
  resume = (run_dir / "checkpoints").is_dir()
  training.train(dataclasses.replace(pre_cfg, resume=resume, overwrite=not resume),
                 pretrain_task(lambda model: kept.update(model=model)), "adamw", run_dir)
  graphdef, state = nnx.split(kept["model"])
  flat = {k: np.asarray(v) for k, v in _flatten(nnx.to_pure_dict(state)).items()}
  tmp = folder / (WEIGHTS + ".tmp.npz")
  np.savez(tmp, **flat)
  tmp.replace(weights)  # atomic: a weights file is always complete
  shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)  # the weights are enough now
  print(f"pretrained weights cached in {folder}")
  return graphdef, state


def pretraining_config(cfg: config.ScriptConfig) -> config.ScriptConfig:
  """The options of the pretraining run: AdamW for ``--pretrain-steps`` steps at its default rate,
  evaluated and checkpointed at the end, the warmup capped at a tenth of the steps."""
  return dataclasses.replace(
      cfg, optimizer="adamw", steps=cfg.pretrain_steps, learning_rate=None, compare="",
      stop_at=None, resume=False, overwrite=True, export=None, eval_every=cfg.pretrain_steps,
      checkpoint_every=cfg.pretrain_steps, warmup_steps=min(cfg.warmup_steps,
                                                            cfg.pretrain_steps // 10))


class PretrainedModel:
  """``make_model`` for ``--pretrain-steps``: pretrains once (or loads the cache, see
  :func:`pretrained_state`), then every call returns a fresh copy of the pretrained model.

  Args:
    kind: the pretraining's name in the cache folder, e.g. ``llama-lm``.
    cfg: the script's options (the pretraining's are :func:`pretraining_config`'s).
    model_cfg: the model's config (part of the cache key).
    tok: the tokenizer (part of the cache key).
    texts: the pretraining texts (part of the cache key).
    make_model: builds the model before pretraining.
    pretrain_task: ``keep -> training.Task``, the pretraining's task, whose ``after_training``
      calls ``keep(model)`` with the trained model.
  """

  def __init__(self, kind: str, cfg: config.ScriptConfig, model_cfg: Any, tok: Any,
               texts: Sequence[str], make_model: Callable[[], Any],
               pretrain_task: Callable[[Callable], Any]):
    self.kind, self.cfg, self.model_cfg, self.tok, self.texts = kind, cfg, model_cfg, tok, texts
    self.make_model, self.pretrain_task = make_model, pretrain_task
    self._pretrained = None  # (graphdef, state), once pretrained or loaded

  def __call__(self):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    if self._pretrained is None:
      self._pretrained = pretrained_state(
          self.kind, self.cfg, pretraining_config(self.cfg), self.model_cfg, self.tok, self.texts,
          self.make_model, self.pretrain_task, self.cfg.pretrain_cache)
    graphdef, state = self._pretrained
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def checkpoint_model(cfg: config.ScriptConfig, model_type: str, model_class: Any, **kwargs):
  """``(tokenizer, make_model)`` of ``--model``'s Hugging Face checkpoint: ``model_type`` (e.g.
  ``llama``) is checked first, and a checkpoint ``model_class.load_pretrained`` refuses is one
  line. ``kwargs`` go to ``load_pretrained`` with the model options of the command line."""
  from examples.models import base

  try:
    base.read_hf_config(cfg.model, [model_type])
  except ValueError as e:
    raise errors.UsageError(f"--model: {e}") from None
  tok = data.pretrained_tokenizer(cfg.model)

  def make_model():
    try:
      return model_class.load_pretrained(cfg.model, seed=cfg.seed, **kwargs, **cfg.model_options())
    except ValueError as e:
      raise errors.UsageError(f"--model: {e}") from None

  return tok, make_model
