"""What the fine-tuning examples share: config and CLI, optimizers, tokenizer, training loop,
checkpoints, metrics, plots and the ``--compare`` summary.

A script describes its job as a :class:`Task` (model, loss, data) and calls :func:`run`; everything
else happens here, so that ``finetune_llama.py`` and ``finetune_roberta.py`` stay thin.

Training is functional: the model is split into the trainable parameters (a plain nested dict, so
paths read ``layers.3.mlp.gate_proj.kernel`` for BAdam's block partitioner and every optax
transformation sees plain arrays) and the rest (frozen LoRA bases). One jitted step serves every
optimizer; BAdam instead uses ``optax_memopt.make_block_step``, which differentiates only the
active block.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

OPTIMIZERS = ("adamw", "badam", "badam_ratio", "adarankgrad", "galore", "lora")
# Chosen on the default tasks (200-step runs, see benchmarks/RESULTS.md): full AdamW learns the RoBERTa
# task at 1e-3 and stalls at the majority class at 3e-3; the block, projected and adapter methods
# change fewer directions per step and want 3e-3 (GaLore and AdaRankGrad at 1e-3 reach a clearly
# higher Llama loss).
DEFAULT_LEARNING_RATES = {"adamw": 1e-3, "galore": 3e-3, "adarankgrad": 3e-3, "badam": 3e-3,
                          "badam_ratio": 3e-3, "lora": 3e-3}


class UsageError(Exception):
  """A problem with the user's input; the scripts print it as one line and exit."""


def field(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - argparse's name
  """A config field with its help text (shown by ``--help``)."""
  return dataclasses.field(default=default, metadata={"help": help, **kwargs})


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass
class TrainConfig:
  """Fields shared by both examples; each script's config extends it."""

  optimizer: str = field("badam", f"one of {', '.join(OPTIMIZERS)}")
  learning_rate: float | None = field(None, "peak learning rate (warmup, then cosine decay to "
                                      "10%); default per optimizer, see DEFAULT_LEARNING_RATES")
  warmup_steps: int = field(20, "linear warmup steps")
  steps: int = field(400, "training steps")
  batch_size: int = field(16, "sequences per step")
  max_examples: int | None = field(None, "use at most this many examples (before the eval split)")
  seed: int = field(0, "seed of the model init, data order and BAdam's block order")
  weight_decay: float = field(0.0, "decoupled weight decay")
  clip_norm: float = field(1.0, "global gradient-norm clipping (0: off)")
  switch_every: int = field(20, "BAdam / BAdam-ratio: steps per block before switching")
  switch_mode: str = field("random", "BAdam block order: random, ascending, descending, fixed")
  update_ratio: float = field(0.1, "BAdam-ratio: fraction of each tensor trained at a time")
  rank: int = field(16, "GaLore rank and AdaRankGrad maximum rank")
  info_threshold: float | None = field(None, "AdaRankGrad: fraction of each gradient's energy "
                                       "the adaptive rank keeps (default: the library's)")
  refresh_threshold: float | None = field(None, "AdaRankGrad: refresh a subspace once its "
                                          "projected gradient norm falls below this fraction of "
                                          "its value at the last refresh (default: the library's)")
  moment_transform: bool = field(True, "AdaRankGrad: carry the Adam moments into a refreshed "
                                 "subspace (--no-moment-transform resets them)")
  galore_update_gap: int = field(50, "GaLore: steps between projection updates")
  lora_rank: int = field(8, "LoRA adapter rank")
  eval_every: int = field(100, "evaluate every this many steps (and at the end)")
  log_every: int = field(10, "progress bar and metrics every this many steps")
  checkpoint_every: int = field(100, "orbax checkpoint every this many steps (and at the end)")
  stop_at: int | None = field(None, "stop at this step as if interrupted (then use --resume)")
  resume: bool = field(False, "continue from the latest checkpoint in --out")
  compare: str = field("", "comma-separated optimizers to run on the same data and seed, "
                       "e.g. adamw,badam,adarankgrad")
  out: str | None = field(None, "run directory (default runs/<name>)")
  mesh: str | None = field(None, "shard over a device mesh, e.g. 'data=2,model=4' (FSDP over "
                           "'data', tensor parallel over 'model'; sizes multiply to the device "
                           "count, one may be -1); default: one device")
  cpu_devices: int | None = field(None, "simulate this many CPU devices (to try --mesh on a "
                                  "machine without accelerators)")

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise UsageError(f"unknown optimizer {self.optimizer!r}; choose one of "
                       f"{', '.join(OPTIMIZERS)}")
    for name in self.compare_list:
      if name not in OPTIMIZERS:
        raise UsageError(f"--compare: unknown optimizer {name!r}; choose from "
                         f"{', '.join(OPTIMIZERS)}")
    for name in ("steps", "batch_size", "switch_every", "rank", "lora_rank", "eval_every",
                 "log_every", "checkpoint_every", "galore_update_gap"):
      if getattr(self, name) < 1:
        raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < self.update_ratio <= 1:
      raise UsageError("--update-ratio must be in (0, 1]")
    for name in ("info_threshold", "refresh_threshold"):
      value = getattr(self, name)
      if value is not None and not 0 < value <= 1:
        raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1]")
    if self.switch_mode not in ("random", "ascending", "descending", "fixed"):
      raise UsageError("--switch-mode must be random, ascending, descending or fixed")
    if self.learning_rate is not None and self.learning_rate <= 0:
      raise UsageError("--learning-rate must be positive")
    if self.cpu_devices is not None and self.cpu_devices < 1:
      raise UsageError("--cpu-devices must be at least 1")
    if self.warmup_steps >= self.steps:
      self.warmup_steps = max(0, self.steps // 10)

  @property
  def compare_list(self) -> list[str]:
    return [s.strip() for s in self.compare.split(",") if s.strip()]


def _arg_type(annotation: Any):
  """(python type, is_bool) of a field annotation such as ``int``, ``str | None``."""
  if isinstance(annotation, str):
    annotation = eval(annotation, vars(typing) | {"types": types})  # noqa: S307 - our annotations
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  base = args[0] if args else annotation
  return base, base is bool


def parse_config(cls: type, argv: Sequence[str] | None, description: str):
  """Builds ``cls`` from ``--field-name value`` overrides; every field of ``cls`` is an option."""
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  for f in dataclasses.fields(cls):
    kind, is_bool = _arg_type(f.type)
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
    if is_bool:
      parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                          default=f.default, help=help_text)
    else:
      parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text,
                          metavar=f.name.upper())
  cfg = cls(**vars(parser.parse_args(argv)))
  if cfg.cpu_devices:
    try:
      jax.config.update("jax_num_cpu_devices", cfg.cpu_devices)
    except RuntimeError:
      raise UsageError("--cpu-devices must be set before JAX starts (it cannot change the devices "
                       "of a running process)") from None
  return cfg


def main_guard(main: Callable[[Sequence[str] | None], Any]):
  """Turns a :class:`UsageError` into a one-line ``SystemExit`` (no traceback)."""

  @functools.wraps(main)
  def wrapped(argv=None):
    try:
      return main(argv)
    except UsageError as e:
      raise SystemExit(f"error: {e}") from None

  return wrapped


# ---------------------------------------------------------------------------------------------
# Tokenizer.


class Tokenizer:
  """The few things the examples need from a tokenizer (``tokenizers`` or transformers)."""

  def __init__(self, tok: Any, *, bos: int | None, eos: int | None, pad: int):
    self._tok, self.bos_id, self.eos_id, self.pad_id = tok, bos, eos, pad
    self.vocab_size = tok.get_vocab_size() if hasattr(tok, "get_vocab_size") else len(tok)

  def encode(self, text: str) -> list[int]:
    if hasattr(self._tok, "get_vocab_size"):
      return self._tok.encode(text).ids
    return self._tok.encode(text, add_special_tokens=False)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids))


def bpe_tokenizer(texts: Sequence[str], path: pathlib.Path, *, vocab_size: int,
                  special: Sequence[str], bos: str, eos: str, pad: str) -> Tokenizer:
  """A byte-level BPE trained on ``texts`` in seconds, cached at ``path`` (``tokenizer.json``)."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers

  if path.is_file():
    tok = HFTokenizer.from_file(str(path))
  else:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
  return Tokenizer(tok, bos=tok.token_to_id(bos), eos=tok.token_to_id(eos), pad=tok.token_to_id(pad))


def pretrained_tokenizer(model_dir: str) -> Tokenizer:
  from transformers import AutoTokenizer

  try:
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  except Exception as e:  # transformers raises several kinds; the message is what matters
    raise UsageError(f"cannot load a tokenizer from {model_dir}: {str(e).splitlines()[0]}") from None
  pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
  return Tokenizer(tok, bos=tok.bos_token_id, eos=tok.eos_token_id, pad=pad)


# ---------------------------------------------------------------------------------------------
# Data.


def read_records(path: str, what: str) -> list[dict]:
  """Rows of a JSON list or JSONL file, with a one-line error for a missing or malformed file."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise UsageError(f"{what} file {path} not found; give a JSON or JSONL file")
  text = p.read_text(encoding="utf-8")
  try:
    if text.lstrip().startswith("["):
      rows = json.loads(text)
    else:
      rows = [json.loads(line) for line in text.splitlines() if line.strip()]
  except json.JSONDecodeError as e:
    raise UsageError(f"{what} file {path} is not valid JSON/JSONL ({e.msg} at line {e.lineno}); "
                     "give a JSON list or one JSON object per line") from None
  if not rows or not all(isinstance(r, dict) for r in rows):
    raise UsageError(f"{what} file {path} must hold a non-empty list of JSON objects")
  return rows


def load_hub_dataset(name: str, *args, **kwargs):
  """``datasets.load_dataset``, imported lazily with a clear message when it is unavailable."""
  try:
    import datasets
  except ImportError:
    raise UsageError(f"{name!r} is not a local file, and loading it from the Hugging Face hub "
                     "needs `pip install datasets`") from None
  try:
    return datasets.load_dataset(name, *args, **kwargs)
  except Exception as e:  # offline, unknown name, ...: one line is enough
    raise UsageError(f"cannot load dataset {name!r} from the hub: "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def pad_rows(data: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Pads every array to a multiple of ``multiple`` rows; padded rows get ``weight`` 0."""
  n = len(next(iter(data.values())))
  extra = -n % multiple
  out = {k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in data.items()}
  out["weight"] = np.concatenate([np.ones(n, np.float32), np.zeros(extra, np.float32)])
  return out


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Rows of the batch at ``step``: a pure function of (seed, step), so resuming is exact."""
  per_epoch = n // batch_size
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[i * batch_size:(i + 1) * batch_size]


# ---------------------------------------------------------------------------------------------
# The task a script hands to the trainer.


@dataclasses.dataclass
class Task:
  name: str  # run name (default directory runs/<name>)
  make_model: Callable[[], nnx.Module]  # the model before fine-tuning (same for every optimizer)
  loss_fn: Callable[[nnx.Module, dict], tuple[jax.Array, dict]]  # → (mean loss, summed stats)
  train_data: dict[str, np.ndarray]  # equal-length arrays, one row per example
  eval_data: dict[str, np.ndarray]
  tokens_key: str = "attention_mask"  # the array whose sum counts the tokens of a batch
  head: tuple[str, ...] = ()  # top-level names of a new task head: trained by every optimizer
  from_scratch: bool = True  # random-init model: BAdam also trains the embedding and head
  after_training: Callable[[nnx.Module], None] | None = None  # e.g. print a generation
  # (path regex, PartitionSpec) rules for --mesh (see examples/sharding.py); None: params are
  # replicated and only the batch is split (data parallelism).
  sharding_rules: Sequence[tuple[str, Any]] | None = None


# ---------------------------------------------------------------------------------------------
# Optimizers.


def apply_lora(module: nnx.Module, rank: int, rngs: nnx.Rngs) -> None:
  """Wraps every ``nnx.Linear`` below ``module`` in ``nnx.LoRA`` (``lora_b`` starts at zero)."""
  for name, value in list(vars(module).items()):
    if isinstance(value, nnx.Linear):
      lora = nnx.LoRA(value.in_features, rank, value.out_features, base_module=value,
                      param_dtype=value.param_dtype, rngs=rngs)
      setattr(module, name, lora)
    elif isinstance(value, nnx.Module):
      apply_lora(value, rank, rngs)
    elif isinstance(value, list | tuple | nnx.List):
      for item in value:
        if isinstance(item, nnx.Module):
          apply_lora(item, rank, rngs)


def make_optimizer(cfg: TrainConfig, name: str, params: dict,
                   task: Task) -> optax.GradientTransformation:
  """The optimizer ``name`` over the trainable ``params`` (a nested dict)."""
  import optax_memopt

  lr = cfg.learning_rate or DEFAULT_LEARNING_RATES.get(name, 1e-3)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup_steps, cfg.steps,
                                                end_value=0.1 * lr)
  if name in ("adamw", "lora"):
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  elif name == "galore":
    tx = optax.contrib.galore(schedule, rank=cfg.rank, update_proj_gap=cfg.galore_update_gap,
                              weight_decay=cfg.weight_decay)
  elif name == "badam":
    labels = optax_memopt.block_labels(params, include_embedding=task.from_scratch,
                                       include_lm_head=task.from_scratch or bool(task.head))
    tx = optax_memopt.badam(schedule, blocks=labels, switch_every=cfg.switch_every,
                            switch_mode=cfg.switch_mode, seed=cfg.seed,
                            weight_decay=cfg.weight_decay)
  elif name == "badam_ratio":
    tx = optax_memopt.badam_ratio(schedule, update_ratio=cfg.update_ratio,
                                  switch_every=cfg.switch_every, seed=cfg.seed,
                                  weight_decay=cfg.weight_decay)
  elif name == "adarankgrad":
    extra = {k: getattr(cfg, k) for k in ("info_threshold", "refresh_threshold")
             if getattr(cfg, k) is not None}
    tx = optax_memopt.adarankgrad(schedule, max_rank=cfg.rank, weight_decay=cfg.weight_decay,
                                  moment_transform=cfg.moment_transform, **extra)
  else:
    raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx


def optimizer_probe(name: str, opt_state) -> dict:
  """What the progress bar shows besides the loss: BAdam's block, AdaRankGrad's mean rank."""
  import optax_memopt

  if name == "badam":
    return {"block": int(optax_memopt.active_block(opt_state))}
  if name == "adarankgrad":
    ranks = [np.ravel(np.asarray(r)) for r in jax.tree.leaves(optax_memopt.effective_ranks(opt_state))]
    return {"rank": round(float(np.mean(np.concatenate(ranks))), 2)} if ranks else {}
  return {}


def tree_bytes(tree) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Training.


class _Trainable:
  """The model split into trainable params (a nested dict) and the frozen rest."""

  def __init__(self, model: nnx.Module, trainable: Any):
    self.graphdef, state, self.rest = nnx.split(model, trainable, ...)
    self.params = nnx.to_pure_dict(state)
    self._abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

  def merge(self, params, rest) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self._abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state, rest)


def _make_steps(split: _Trainable, loss_fn, tx, optimizer: str):
  import optax_memopt

  def loss(params, rest, batch):
    return loss_fn(split.merge(params, rest), batch)

  if optimizer == "badam":
    train_step = optax_memopt.make_block_step(loss, tx, has_aux=True)
  else:

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, rest, batch):
      (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, rest, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, (value, aux)

  @jax.jit
  def eval_step(params, rest, batch):
    return loss(params, rest, batch)[1]

  return train_step, eval_step


def _evaluate(eval_step, params, rest, data: dict, batch_size: int, place) -> dict:
  n = len(data["weight"])
  totals: dict[str, float] = {}
  for i in range(0, n, batch_size):
    batch = place.batch({k: v[i:i + batch_size] for k, v in data.items()})
    stats = jax.device_get(eval_step(params, rest, batch))
    for k, v in stats.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  out = {"eval_loss": totals["nll_sum"] / max(totals["count"], 1.0)}
  if "correct" in totals:
    out["eval_accuracy"] = totals["correct"] / max(totals["count"], 1.0)
  return out


class _Placement:
  """Where arrays live: the default device, or a device mesh (``--mesh``).

  On a mesh the params are placed by the task's partition rules (FSDP over ``data``, tensor
  parallelism over ``model``), the optimizer state is born sharded like them
  (``sharding.init_state``), the frozen rest is replicated and each batch is split over ``data``.
  The jitted steps then run as one SPMD program over the mesh.
  """

  def __init__(self, cfg: TrainConfig, task: Task):
    self.mesh = None
    if not cfg.mesh:
      return
    from examples import sharding

    try:
      self.mesh = sharding.make_mesh(cfg.mesh)
    except ValueError as e:
      raise UsageError(f"--mesh: {e} (jax sees {jax.device_count()} devices; on a CPU use "
                       "--cpu-devices N to simulate N)") from None
    data = self.mesh.shape.get(sharding.DATA, 1)
    if cfg.batch_size % data:
      raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by the mesh's data axis "
                       f"({data})")
    self._sharding = sharding
    self._rules = task.sharding_rules or [(r".*", jax.sharding.PartitionSpec())]

  def params(self, params):
    return params if self.mesh is None else self._sharding.shard_params(params, self.mesh,
                                                                        self._rules)

  def replicated(self, tree):
    if self.mesh is None:
      return tree
    return jax.device_put(tree, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

  def opt_state(self, tx, params):
    return tx.init(params) if self.mesh is None else self._sharding.init_state(tx, params,
                                                                               self.mesh)

  def batch(self, batch: dict) -> dict:
    return batch if self.mesh is None else jax.device_put(
        batch, self._sharding.batch_sharding(self.mesh))


def _checkpoint_manager(directory: pathlib.Path):
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(directory.resolve(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


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


def _pack(tree) -> dict[str, jax.Array]:
  """The non-empty leaves by flat index: orbax cannot save zero-size arrays (badam_ratio has some)."""
  return {str(i): x for i, x in enumerate(jax.tree.leaves(tree)) if x.size}


def _unpack(packed: dict, template):
  leaves, treedef = jax.tree.flatten(template)
  return treedef.unflatten([packed.get(str(i), x) for i, x in enumerate(leaves)])


def train(cfg: TrainConfig, task: Task, optimizer: str, out: pathlib.Path) -> dict:
  """Trains ``task`` with ``optimizer``; writes metrics, plot and checkpoints to ``out``."""
  import orbax.checkpoint as ocp
  from tqdm.auto import tqdm

  out.mkdir(parents=True, exist_ok=True)
  model = task.make_model()
  if optimizer == "lora":
    if getattr(model.config, "scan_layers", False):
      raise UsageError("--optimizer lora needs the layers as a list (no --scan-layers)")
    rngs = nnx.Rngs(cfg.seed + 1)
    for layer in model.layers:  # the attention and MLP projections; not lm_head or a task head
      apply_lora(layer, cfg.lora_rank, rngs)
    trainable = nnx.Any(nnx.LoRAParam, *[nnx.PathContains(h) for h in task.head])
  else:
    trainable = nnx.Param
  split = _Trainable(model, trainable)
  tx = make_optimizer(cfg, optimizer, split.params, task)
  params, rest = split.params, split.rest
  place = _Placement(cfg, task)
  params, rest = place.params(params), place.replicated(rest)
  opt_state = _distinct_buffers(place.opt_state(tx, params), params)
  train_step, eval_step = _make_steps(split, task.loss_fn, tx, optimizer)

  n_train = len(task.train_data["weight"])
  if n_train < cfg.batch_size:
    raise UsageError(f"only {n_train} training examples for --batch-size {cfg.batch_size}; "
                     "lower the batch size or add data")
  eval_batch = 4 * cfg.batch_size  # no gradients: bigger batches fit
  eval_data = pad_rows({k: v for k, v in task.eval_data.items() if k != "weight"}, eval_batch)

  # Checkpoints: params, optimizer state (with BAdam's block order and RNG) and the step, which
  # is also the data position (see batch_indices).
  ckpt_dir = out / "checkpoints"
  metrics_path = out / "metrics.jsonl"
  start = 0
  if not cfg.resume and ckpt_dir.exists():
    shutil.rmtree(ckpt_dir)
  manager = _checkpoint_manager(ckpt_dir)
  if cfg.resume and manager.latest_step() is not None:
    start = manager.latest_step()
    template = {"params": params, "opt": opt_state}
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _pack(template))
    restored = manager.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    if restored["meta"]["optimizer"] != optimizer:
      raise UsageError(f"--resume: {ckpt_dir} holds a {restored['meta']['optimizer']} run, "
                       f"not {optimizer}")
    state = _unpack(restored["state"], template)
    params, opt_state = state["params"], state["opt"]
    print(f"resumed {optimizer} from step {start} ({ckpt_dir})")
  records = []
  if start and metrics_path.exists():
    records = [r for r in map(json.loads, metrics_path.read_text().splitlines())
               if r["step"] <= start]
  metrics_file = metrics_path.open("w")
  for r in records:
    metrics_file.write(json.dumps(r) + "\n")

  def save(step):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_pack({"params": params, "opt": opt_state})),
        meta=ocp.args.JsonSave({"step": step, "optimizer": optimizer, "seed": cfg.seed})))

  def log(record):
    records.append(record)
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()

  state_bytes = tree_bytes(opt_state)
  end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
  bar = tqdm(total=cfg.steps, initial=start, desc=f"{task.name}/{optimizer}", dynamic_ncols=True,
             file=sys.stdout, mininterval=1.0)
  pending: list[tuple[int, jax.Array]] = []
  step_times: list[float] = []
  tokens, t_last, first_interval = 0, time.perf_counter(), True
  t_start = t_last
  for step in range(start, end):
    idx = batch_indices(n_train, cfg.batch_size, cfg.seed, step)
    batch = {k: v[idx] for k, v in task.train_data.items()}
    tokens += int(batch[task.tokens_key].sum())
    batch = place.batch(batch)
    params, opt_state, (loss, _) = train_step(params, opt_state, rest, batch)
    pending.append((step + 1, loss))
    done = step + 1
    if done % cfg.log_every == 0 or done == end:
      losses = jax.device_get([x for _, x in pending])
      dt = time.perf_counter() - t_last
      info = {"tokens_per_s": round(tokens / dt, 1), "step_time": dt / len(pending),
              **optimizer_probe(optimizer, opt_state)}
      if not first_interval:  # the first interval includes compilation
        step_times.append(dt / len(pending))
      for (s, _), value in zip(pending, losses, strict=True):
        log({"step": s, "loss": float(value), **(info if s == done else {})})
      bar.set_postfix({"loss": f"{float(losses[-1]):.3f}", "tok/s": f"{tokens / dt:.0f}",
                       **{k: v for k, v in info.items() if k in ("block", "rank")}})
      bar.update(len(pending))
      pending, tokens, first_interval, t_last = [], 0, False, time.perf_counter()
    if done % cfg.eval_every == 0 or done == cfg.steps:
      log({"step": done, **_evaluate(eval_step, params, rest, eval_data, eval_batch, place)})
      t_last = time.perf_counter()
    if done % cfg.checkpoint_every == 0 or done == end:
      save(done)
  bar.close()
  manager.wait_until_finished()
  manager.close()
  metrics_file.close()
  wall = time.perf_counter() - t_start
  plot_curves({optimizer: records}, out / "loss.png", title=task.name)

  train_losses = [r["loss"] for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  summary = {
      "optimizer": optimizer,
      "steps": end,
      "first_loss": train_losses[0] if train_losses else float("nan"),
      "final_loss": float(np.mean(train_losses[-10:])) if train_losses else float("nan"),
      **({k: v for k, v in evals[-1].items() if k != "step"} if evals else {}),
      "trainable_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "opt_state_bytes": state_bytes,
      "median_step_s": float(np.median(step_times)) if step_times else float("nan"),
      "wall_s": wall,
  }
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  if task.after_training is not None and end == cfg.steps:
    task.after_training(split.merge(params, rest))
  return summary


# ---------------------------------------------------------------------------------------------
# Reports.


def plot_curves(runs: dict[str, list[dict]], path: pathlib.Path, title: str = "") -> None:
  """Training loss (and eval loss, dashed) against step, one colour per run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i, (name, records) in enumerate(runs.items()):
    color = f"C{i}"
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    ax.plot(steps, losses, color=color, alpha=0.35, lw=0.8)
    if len(losses) >= 10:  # a running mean makes the trend readable
      w = max(len(losses) // 30, 5)
      smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
      ax.plot(steps[w - 1:], smooth, color=color, label=f"{name} (train)")
    else:
      ax.lines[-1].set_label(f"{name} (train)")
    ev = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if ev:
      ax.plot(*zip(*ev, strict=True), "o--", color=color, label=f"{name} (eval)")
  ax.set(xlabel="step", ylabel="loss", title=title)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def markdown_table(summaries: Sequence[dict]) -> str:
  has_acc = any("eval_accuracy" in s for s in summaries)
  head = ["optimizer", "steps", "final train loss", "eval loss"] + (
      ["eval accuracy"] if has_acc else []) + ["optimizer state", "median step"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summaries:
    row = [s["optimizer"], str(s["steps"]), f"{s['final_loss']:.3f}",
           f"{s.get('eval_loss', float('nan')):.3f}"]
    if has_acc:
      row.append(f"{s.get('eval_accuracy', float('nan')):.3f}")
    row += [_human_bytes(s["opt_state_bytes"]), f"{1000 * s['median_step_s']:.0f} ms"]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _human_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return ""


def run(cfg: TrainConfig, task: Task) -> list[dict]:
  """One run (``cfg.optimizer``) or, with ``--compare``, several on the same data and seed."""
  out = pathlib.Path(cfg.out or pathlib.Path("runs") / task.name)
  if not cfg.compare_list:
    summary = train(cfg, task, cfg.optimizer, out)
    print(markdown_table([summary]))
    print(f"metrics, plot and checkpoints in {out}")
    return [summary]
  summaries, runs = [], {}
  for name in cfg.compare_list:
    summaries.append(train(cfg, task, name, out / name))
    runs[name] = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
  plot_curves(runs, out / "compare.png", title=f"{task.name}: {', '.join(runs)}")
  table = markdown_table(summaries)
  (out / "compare.md").write_text(table + "\n")
  print(table)
  print(f"plot: {out / 'compare.png'}")
  return summaries
