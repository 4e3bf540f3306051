"""The training loop: a :class:`Task` (model, loss, data) trained with one optimizer, or several.

Training is functional: the model is split into the trainable parameters (a plain nested dict, so
paths read ``layers.3.mlp.gate_proj.kernel`` for BAdam's block partitioner and every optax
transformation sees plain arrays) and the rest: the frozen parameters (LoRA bases) and the state a
forward pass writes (dropout's RNG counts), which every train step returns updated. One jitted step
serves every optimizer; BAdam instead uses ``optax_memopt.make_block_step``, which differentiates only the
active block.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_memopt
from examples import checkpoints, config, errors, optimizers, reporting, rundir
from examples.data import batch_indices, pad_rows
from examples.placement import Placement


@dataclasses.dataclass
class Task:
  """What a script hands to the trainer."""

  name: str  # run name (default directory runs/<name>)
  make_model: Callable[[], nnx.Module]  # the model before fine-tuning (same for every optimizer)
  loss_fn: Callable[[nnx.Module, dict], tuple[jax.Array, dict]]  # → (mean loss, summed stats)
  train_data: dict[str, np.ndarray]  # equal-length arrays, one row per example
  eval_data: dict[str, np.ndarray]
  tokens_key: str = "attention_mask"  # the array whose sum counts the tokens of a batch
  head: tuple[str, ...] = ()  # top-level names of a new task head: trained by every optimizer
  from_scratch: bool = True  # random-init model: BAdam also trains the embedding and head
  # Called with the trained model and the optimizer's name, e.g. to print a generation.
  after_training: Callable[[nnx.Module, str], None] | None = None
  # (path regex, PartitionSpec) rules for --mesh (see examples/sharding.py); None: params are
  # replicated and only the batch is split (data parallelism).
  sharding_rules: Sequence[tuple[str, Any]] | None = None
  tokenizer: Any = None  # an examples.data.Tokenizer, exported with the model
  labels: Sequence[Any] | None = None  # a classifier's class names, exported with the model


class Rest(NamedTuple):
  """What the optimizer does not train."""

  frozen: nnx.State  # parameters left as they are (LoRA bases)
  written: nnx.State  # state the forward pass writes (dropout's RNG counts, batch statistics)


class Trainable:
  """The model split into trainable params (a nested dict) and the :class:`Rest`."""

  def __init__(self, model: nnx.Module, trainable: Any):
    self._filters = (trainable, nnx.Param, ...)
    self.graphdef, state, frozen, written = nnx.split(model, *self._filters)
    self.params = nnx.to_pure_dict(state)
    self.rest = Rest(frozen, written)
    self._abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

  def merge(self, params, rest: Rest) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self._abstract)
    nnx.replace_by_pure_dict(state, params)
    # Fresh variables, of the trace this runs in (under jax.grad the rest passed in belongs to
    # the enclosing trace, and the forward pass could not advance dropout's RNG counts in it).
    return nnx.merge(self.graphdef, state, *jax.tree.map(lambda x: x, tuple(rest)))

  def written(self, model: nnx.Module) -> nnx.State:
    """The state ``model`` holds now where :attr:`Rest.written` was split from."""
    return nnx.split(model, *self._filters)[3]


class _HandsBackRest:
  """A library step (block or layer-wise) returning ``(params, opt_state, rest, (loss, stats))``;
  the step's own attributes (``lower``, ``trace_count``) are read through."""

  def __init__(self, step):
    self._step = step

  def __call__(self, params, opt_state, rest, batch):
    params, opt_state, (value, (stats, written)) = self._step(params, opt_state, rest, batch)
    return params, opt_state, rest._replace(written=written), (value, stats)

  def __getattr__(self, name):
    return getattr(self._step, name)


def make_steps(split: Trainable, loss_fn, tx, optimizer: str, layerwise: bool = False,
               grad_accum: int = 1):
  """``train_step(params, opt_state, rest, batch) -> (params, opt_state, rest, (loss, stats))`` and
  ``eval_step(params, rest, batch) -> stats``; for ``badam`` the train step is the block step,
  with ``layerwise`` the layer-wise step (the optimizer runs inside the backward pass), which with
  ``grad_accum > 1`` takes the ``grad_accum`` micro-batches of one optimizer step stacked
  (``[grad_accum, batch, ...]``). The returned ``rest`` holds the state the step wrote (the next
  dropout masks' RNG counts)."""

  def loss(params, rest, batch):
    model = split.merge(params, rest)
    value, stats = loss_fn(model, batch)
    return value, (stats, split.written(model))

  accumulate = layerwise and grad_accum > 1
  if accumulate and jax.tree.leaves(split.rest.written):
    # Under accumulate=N the micro-batches run side by side (a vmap) from the same written state:
    # they would draw the same dropout masks.
    raise ValueError("--layerwise with --grad-accum > 1: the model writes state in its forward pass "
                     "(dropout RNG counts), which the micro-batches of one step would share; use "
                     "--grad-accum 1 or the ordinary step")
  block_step = optimizers.get(optimizer).block_step
  if block_step or layerwise:
    if block_step:
      step = optax_memopt.make_block_step(loss, tx, has_aux=True)
    elif accumulate:
      step = optax_memopt.make_layerwise_step(loss, tx, has_aux=True, accumulate=grad_accum,
                                              batch_argnums=2)
    else:
      step = optax_memopt.make_layerwise_step(loss, tx, has_aux=True)

    train_step = _HandsBackRest(step)
  else:

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, rest, batch):
      (value, (stats, written)), grads = jax.value_and_grad(loss, has_aux=True)(params, rest, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, rest._replace(written=written), (
          value, stats)

  @jax.jit
  def eval_step(params, rest, batch):
    return loss(params, rest, batch)[1][0]

  return train_step, eval_step


def evaluate(eval_step, params, rest, data: dict, batch_size: int, place: Placement) -> dict:
  """Eval loss (and accuracy, if the loss reports ``correct``) over ``data``."""
  totals: dict[str, float] = {}
  for i in range(0, len(data["weight"]), batch_size):
    batch = place.batch({k: v[i:i + batch_size] for k, v in data.items()})
    for k, v in jax.device_get(eval_step(params, rest, batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  out = {"eval_loss": totals["nll_sum"] / max(totals["count"], 1.0)}
  if "correct" in totals:
    out["eval_accuracy"] = totals["correct"] / max(totals["count"], 1.0)
  return out


def train(cfg: config.TrainConfig, task: Task, optimizer: str, out: pathlib.Path, *,
          export: pathlib.Path | None = None) -> dict:
  """Trains ``task`` with ``optimizer``; writes metrics, plot, checkpoints (and the export) to ``out``.

  Starts over any checkpoints in ``out`` unless ``cfg.resume`` (the command line refuses that
  without ``--overwrite`` before getting here). On Ctrl-C, saves a checkpoint at the current step
  and raises :class:`examples.errors.Interrupted`.

  Returns:
    The run's summary (also written to ``out/summary.json``).
  """
  out.mkdir(parents=True, exist_ok=True)
  model = task.make_model()
  split = Trainable(model, optimizers.add_adapters(model, optimizer, cfg, task))
  tx = optimizers.make_optimizer(cfg, optimizer, split.params, task)
  place = Placement(cfg, task.sharding_rules)
  params, rest = place.params(split.params), place.replicated(split.rest)
  opt_state = _distinct_buffers(place.opt_state(tx, params), params)
  train_step, eval_step = make_steps(split, task.loss_fn, tx, optimizer, layerwise=cfg.layerwise,
                                     grad_accum=cfg.grad_accum)
  stacked = cfg.layerwise and cfg.grad_accum > 1  # one call takes the window's micro-batches
  n_train = len(task.train_data["weight"])
  if n_train < cfg.batch_size:
    raise errors.UsageError(f"only {n_train} training examples for --batch-size {cfg.batch_size}; "
                            "lower the batch size or add data")
  eval_batch = 4 * cfg.batch_size  # no gradients: bigger batches fit
  eval_data = pad_rows({k: v for k, v in task.eval_data.items() if k != "weight"}, eval_batch)

  ckpts = checkpoints.Checkpoints(out / "checkpoints", fresh=not cfg.resume)
  start = (cfg.resume and ckpts.latest_step()) or 0
  end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
  if start:
    recorded = ckpts.meta(start)["optimizer"]
    if recorded != optimizer:
      ckpts.close()
      raise errors.UsageError(f"--resume: {ckpts.directory} holds a {recorded} run, not {optimizer}")
    if start >= end:  # nothing to train: keep what the run wrote
      ckpts.close()
      print(f"{optimizer} in {out} is at step {start} already (asked for {end}): nothing to do")
      return _stored_summary(out, optimizer, start)
    state, meta = ckpts.restore(start, _saved(params, opt_state, rest))
    params, opt_state = state["params"], state["opt"]
    rest = rest._replace(written=state.get("written", rest.written))
    print(f"resumed {optimizer} from step {start} ({ckpts.directory})")
  elif cfg.resume:
    print(f"no checkpoint of {optimizer} in {ckpts.directory}: starting from step 0")

  state_bytes = optimizers.tree_bytes(opt_state)
  progress = reporting.Progress(out / "metrics.jsonl", start=start, total=cfg.steps,
                                desc=f"{task.name}/{optimizer}")
  errors.check_interrupted()
  done = start
  with errors.defer_ctrl_c() as ctrl_c:
    for step in range(start, end):
      # One optimizer step: --grad-accum micro-batches (the optimizer holds back its update
      # until the last one; the layer-wise step takes them all in one call), each its own draw
      # of the data order.
      losses, tokens, window = [], 0, []
      for micro in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
        batch = {k: v[batch_indices(n_train, cfg.batch_size, cfg.seed, micro)]
                 for k, v in task.train_data.items()}
        tokens += int(batch[task.tokens_key].sum())
        if stacked:
          window.append(batch)
          continue
        params, opt_state, rest, (loss, _) = train_step(params, opt_state, rest, place.batch(batch))
        losses.append(loss)
      if stacked:  # the same micro-batches, stacked [grad_accum, batch, ...]
        batch = {k: np.stack([b[k] for b in window]) for k in window[0]}
        params, opt_state, rest, (loss, _) = train_step(params, opt_state, rest,
                                                        place.batch(batch, micro_batches=True))
        losses.append(loss)
      done = step + 1
      progress.step(done, sum(losses) / len(losses), tokens)
      stop = ctrl_c.requested and done < end
      if done % cfg.log_every == 0 or done == end or stop:
        progress.flush(**optimizers.optimizer_probe(optimizer, opt_state))
      if done % cfg.eval_every == 0 or done == cfg.steps:
        progress.log({"step": done, **evaluate(eval_step, params, rest, eval_data, eval_batch,
                                               place)})
        progress.restart_clock()
      if done % cfg.checkpoint_every == 0 or done == end or stop:
        ckpts.save(done, _saved(params, opt_state, rest),
                   {"step": done, "optimizer": optimizer, "seed": cfg.seed})
      if stop:
        break
    progress.close()
    ckpts.close()
  if ctrl_c.requested and done < end:
    raise errors.Interrupted(done)
  ctrl_c.requested = False  # during the last save: the run is whole, finish it

  summary = {"optimizer": optimizer, "steps": end, **reporting.summarize(
      progress.records, step_times=progress.step_times,
      trainable_params=int(sum(x.size for x in jax.tree.leaves(params))),
      opt_state_bytes=state_bytes, wall_s=time.perf_counter() - progress.start_time)}
  (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
  reporting.plot_curves({optimizer: progress.records}, out / "loss.png", title=task.name)
  if end == cfg.steps and (task.after_training is not None or export is not None):
    trained = split.merge(params, rest)
    if task.after_training is not None:
      task.after_training(trained, optimizer)
    if export is not None:
      checkpoints.export_hf(trained, task.tokenizer, export, labels=task.labels)
      print(f"exported the {optimizer} model as a Hugging Face checkpoint to {export}")
  return summary


def run(cfg: config.TrainConfig, task: Task) -> list[dict]:
  """One run (``cfg.optimizer``) or, with ``--compare``, several on the same data and seed."""
  dirs = rundir.run_dirs(cfg)
  summaries = [train(cfg, task, name, out, export=rundir.export_dir(cfg, name))
               for name, out in dirs.items()]
  table = reporting.markdown_table(summaries)
  print(table)
  if not cfg.compare_list:
    print(f"metrics, plot and checkpoints in {dirs[cfg.optimizer]}")
    return summaries
  out = rundir.output_dir(cfg)
  runs = {name: [json.loads(line) for line in (d / "metrics.jsonl").open()]
          for name, d in dirs.items()}
  reporting.plot_curves(runs, out / "compare.png", title=f"{task.name}: {', '.join(runs)}")
  (out / "compare.md").write_text(table + "\n")
  print(f"plot: {out / 'compare.png'}; each run's metrics and checkpoints in {out}/<optimizer>")
  return summaries


# ---------------------------------------------------------------------------------------------
# Helpers of the loop.


def _stored_summary(out: pathlib.Path, optimizer: str, step: int) -> dict:
  """The summary an earlier invocation wrote (a resumed run with nothing left to train)."""
  path = out / "summary.json"
  if path.is_file():
    return json.loads(path.read_text())
  records = [json.loads(line) for line in (out / "metrics.jsonl").open()] if (
      out / "metrics.jsonl").is_file() else []
  return {"optimizer": optimizer, "steps": step,
          **reporting.summarize(records, opt_state_bytes=0, wall_s=None)}


def _saved(params, opt_state, rest: Rest) -> dict:
  """What a checkpoint holds: params, optimizer state and, when the model has any, the state its
  forward pass writes (dropout's RNG counts: a resumed run draws the masks it would have drawn)."""
  saved = {"params": params, "opt": opt_state}
  if jax.tree.leaves(rest.written):
    saved["written"] = rest.written
  return saved


def _distinct_buffers(tree, *others):
  """Copies leaves that share a buffer with an earlier leaf or with ``others``: the train step
  donates params and optimizer state, and one buffer cannot be donated twice."""
  seen = {id(x) for x in jax.tree.leaves(others)}

  def fresh(x):
    if id(x) in seen:
      return jnp.copy(x)
    seen.add(id(x))
    return x

  return jax.tree.map(fresh, tree)
