"""The examples' options as data: :class:`TrainConfig`, the fields both scripts share.

A script's options are the fields of a dataclass (:class:`TrainConfig`, extended by
:class:`ScriptConfig` with the model and pretraining options both scripts have, and by the
script's own ``Config``); each field carries its help text (:func:`field`), and ``__post_init__``
checks the values, raising :class:`~examples.errors.UsageError` with one line. The command line
made from the fields is ``examples/cli.py``'s; where a run writes is ``examples/rundir.py``'s.

This module imports no JAX (nor Flax): a script prints its first line before the few seconds the
heavy imports take.
"""

from __future__ import annotations

import dataclasses
import pathlib
import typing
from typing import Any

from examples.errors import UsageError
from examples.optimizers import DEFAULT_LEARNING_RATES, LAYERWISE_OPTIMIZERS, OPTIMIZERS

FINAL_LOSS_STEPS = 10  # the "final train loss" is the mean over this many last steps
MESH_AXES = ("data", "model")  # FSDP over data, tensor parallelism over model (examples/sharding.py)
DTYPES = ("float32", "bfloat16")


def field(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - argparse's name
  """A config field with its help text (shown by ``--help``); ``choices=(...)`` limits its values."""
  return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def flag(name: str) -> str:
  """The command-line option of a config field: ``scan_layers`` -> ``--scan-layers``."""
  return "--" + name.replace("_", "-")


def _learning_rate_help() -> str:
  by_rate: dict[float, list[str]] = {}
  for name, lr in DEFAULT_LEARNING_RATES.items():
    by_rate.setdefault(lr, []).append(name)
  defaults = "; ".join(f"{lr:g} for {', '.join(names)}" for lr, names in by_rate.items())
  return f"peak learning rate (warmup, then cosine decay to 10%%); default: {defaults}"


@dataclasses.dataclass
class TrainConfig:
  """Fields shared by both examples; each script's config extends it."""

  optimizer: str = field("badam", f"one of {', '.join(OPTIMIZERS)}")
  learning_rate: float | None = field(None, _learning_rate_help())
  warmup_steps: int = field(20, "linear warmup steps")
  steps: int = field(400, "training steps")
  batch_size: int = field(16, "sequences per step")
  grad_accum: int = field(1, "micro-batches of --batch-size per optimizer step (gradient "
                          "accumulation; --steps counts optimizer steps): BAdam accumulates its "
                          "active block only (badam(accumulate_every=N)), --layerwise takes the N "
                          "micro-batches in one step (make_layerwise_step(accumulate=N)), the other "
                          "optimizers use optax.MultiSteps")
  max_examples: int | None = field(None, "use at most this many examples (before the eval split)")
  seed: int = field(0, "seed of the model init, data order and BAdam's block order")
  weight_decay: float = field(0.0, "decoupled weight decay")
  clip_norm: float = field(1.0, "global gradient-norm clipping (0: off)")
  layerwise: bool = field(False, "apply the optimizer inside the backward pass, layer by layer "
                          "(optax_memopt.make_layerwise_step: no gradient larger than one layer's "
                          f"is held); for {', '.join(LAYERWISE_OPTIMIZERS)}; needs --scan-layers; "
                          "global-norm clipping needs the whole gradient, so --clip-norm is off")
  switch_every: int = field(20, "BAdam / BAdam-ratio: steps per block before switching")
  switch_mode: str = field("random", "BAdam block order: random, ascending, descending, fixed")
  always_active_head: bool = field(True, "BAdam / BAdam-ratio: train a new task head (RoBERTa's "
                                   "classifier) at every step, as the BAdam reference's "
                                   "active_modules (--no-always-active-head: the head is one more "
                                   "block, trained 1/D of the time)")
  always_active: str = field("", "BAdam / BAdam-ratio: comma-separated regular expressions of "
                             "further parameters trained at every step whatever the active "
                             "block (dotted paths matched on whole components, e.g. 'embeddings'; "
                             "a parameter BAdam would freeze is then trained)")
  reset_always_active: bool = field(True, "BAdam: reset the always-active parameters' Adam moments "
                                    "at every block switch, as the reference does "
                                    "(--no-reset-always-active keeps them for the whole run)")
  update_ratio: float = field(0.1, "BAdam-ratio: fraction of each tensor trained at a time")
  rank: int = field(16, "GaLore rank and AdaRankGrad maximum rank")
  info_threshold: float | None = field(None, "AdaRankGrad: fraction of each gradient's energy "
                                       "the adaptive rank keeps (default: optax_memopt's, 0.9)")
  min_rank: int | None = field(None, "AdaRankGrad: smallest rank chosen at a refresh (default: "
                              "optax_memopt's)")
  refresh_threshold: float | None = field(None, "AdaRankGrad: refresh a subspace once its "
                                          "projected gradient norm falls below this fraction of "
                                          "its value at the last refresh (default: "
                                          "optax_memopt's, 0.5)")
  moment_transform: bool = field(True, "AdaRankGrad: carry the Adam moments into a refreshed "
                                 "subspace (--no-moment-transform resets them)")
  galore_update_gap: int = field(50, "GaLore: steps between projection updates")
  projection: str = field("layers", "GaLore and AdaRankGrad: which matrices are projected: "
                          "'layers' (those inside the model's layers; the embeddings and heads "
                          "get plain Adam, as in the papers) or 'all' (every matrix)")
  lora_rank: int = field(8, "LoRA adapter rank")
  eval_every: int = field(100, "evaluate every this many steps (and at the end)")
  log_every: int = field(10, "progress bar and metrics every this many steps")
  checkpoint_every: int = field(100, "orbax checkpoint every this many steps, at the end and on "
                                "Ctrl-C")
  stop_at: int | None = field(None, "stop at this step as if interrupted (then use --resume)")
  resume: bool = field(False, "continue from the latest checkpoint in the run directory, with the "
                       "options recorded there (config.json); an option given that contradicts "
                       "them is refused, except --steps (to extend the run) and the evaluation, "
                       "logging, checkpoint, export, generation and --mesh options")
  overwrite: bool = field(False, "replace an earlier run in the run directory: everything it wrote "
                          "is removed first (without it, a run refuses to start over its "
                          "checkpoints)")
  compare: str = field("", "comma-separated optimizers to run on the same data and seed, "
                       "e.g. adamw,badam,adarankgrad (default run directory runs/<name>-compare)")
  out: str | None = field(None, "run directory (default: runs/<name>)")
  export: str | None = field(None, "after training, write a Hugging Face checkpoint (config.json, "
                             "model.safetensors, tokenizer) to this directory (with --compare: one "
                             "subdirectory per optimizer); with --model the default is "
                             "<run directory>/hf")
  mesh: str | None = field(None, "shard over a device mesh, e.g. 'data=2,model=4' (FSDP over "
                           "'data', tensor parallel over 'model'; sizes multiply to the device "
                           "count, one may be -1); default: one device")
  cpu_devices: int | None = field(None, "simulate this many CPU devices (to try --mesh on a "
                                  "machine without accelerators)")

  def __post_init__(self):
    for f in dataclasses.fields(self):
      choices = f.metadata.get("choices")
      if choices and getattr(self, f.name) not in choices:
        raise UsageError(f"{flag(f.name)} {getattr(self, f.name)!r}: choose one of "
                         f"{', '.join(choices)}")
    if self.optimizer not in OPTIMIZERS:
      raise UsageError(f"unknown optimizer {self.optimizer!r}; choose one of "
                       f"{', '.join(OPTIMIZERS)}")
    for name in self.compare_list:
      if name not in OPTIMIZERS:
        raise UsageError(f"--compare: unknown optimizer {name!r}; choose from "
                         f"{', '.join(OPTIMIZERS)}")
    for name in ("steps", "batch_size", "grad_accum", "switch_every", "rank", "lora_rank", "eval_every",
                 "log_every", "checkpoint_every", "galore_update_gap"):
      if getattr(self, name) < 1:
        raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < self.update_ratio <= 1:
      raise UsageError("--update-ratio must be in (0, 1]")
    if self.min_rank is not None and not 1 <= self.min_rank <= self.rank:
      raise UsageError("--min-rank must be between 1 and --rank")
    for name in ("info_threshold", "refresh_threshold"):
      value = getattr(self, name)
      if value is not None and not 0 < value <= 1:
        raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1]")
    if self.projection not in ("layers", "all"):
      raise UsageError("--projection must be layers or all")
    if self.switch_mode not in ("random", "ascending", "descending", "fixed"):
      raise UsageError("--switch-mode must be random, ascending, descending or fixed")
    if self.learning_rate is not None and self.learning_rate <= 0:
      raise UsageError("--learning-rate must be positive")
    if self.cpu_devices is not None and self.cpu_devices < 1:
      raise UsageError("--cpu-devices must be at least 1")
    if self.mesh:
      for part in self.mesh.split(","):
        axis = part.partition("=")[0].strip()
        if axis not in MESH_AXES:
          raise UsageError(f"--mesh {self.mesh}: unknown axis {axis!r}; the axes are data (FSDP) "
                           "and model (tensor parallelism), e.g. data=2,model=4")
    if self.resume and self.overwrite:
      raise UsageError("--resume continues the run in the run directory and --overwrite replaces "
                       "it: give one of them")
    if self.layerwise:
      for name in self.compare_list or [self.optimizer]:
        if name not in LAYERWISE_OPTIMIZERS:
          raise UsageError(f"--layerwise works with {', '.join(LAYERWISE_OPTIMIZERS)}, not {name}")
      self.clip_norm = 0.0
    if self.warmup_steps >= self.steps:
      self.warmup_steps = max(0, self.steps // 10)

  @property
  def compare_list(self) -> list[str]:
    return [s.strip() for s in self.compare.split(",") if s.strip()]


@dataclasses.dataclass
class ScriptConfig(TrainConfig):
  """The model, data-split and pretraining options both scripts have; each script's ``Config``
  extends it (and gives the fields whose default or help is its own again).

  ``MODEL`` names the script's Hugging Face model family in messages (``--model``'s check).
  """

  MODEL: typing.ClassVar[str] = "model"

  name: str = field("run", "run name: the default run directory is runs/<name>")
  model: str | None = field(None, "HF checkpoint directory (weights + tokenizer); default: a "
                            "small random-init model")
  seq_len: int = field(128, "tokens per example, longer ones are cut")
  eval_fraction: float = field(0.1, "held-out fraction of the examples")
  vocab_size: int = field(1024, "BPE vocabulary of the default tokenizer")
  hidden_size: int = field(128, "random-init model: hidden size")
  num_layers: int = field(4, "random-init model: layers")
  num_heads: int = field(4, "random-init model: attention heads")
  intermediate_size: int = field(256, "random-init model: MLP hidden size")
  param_dtype: str = field("float32", "parameter dtype: float32 or bfloat16", choices=DTYPES)
  dtype: str = field("float32", "compute dtype: float32 or bfloat16", choices=DTYPES)
  remat: bool = field(False, "rematerialise each layer in the backward pass")
  scan_layers: bool = field(False, "stack the layers ([L, ...] weights) and run them with "
                            "optax_memopt.scan_layers: BAdam's block step compiles once for all "
                            "layer blocks; needed by --layerwise")
  pretrain_steps: int = field(0, "random-init model: first pretrain it for this many AdamW steps")
  pretrain_cache: str | None = field(None, "folder of the --pretrain-steps cache: the pretrained "
                                     "weights are kept once per pretraining configuration and "
                                     "reused (default: $OPTAX_MEMOPT_PRETRAIN_CACHE or "
                                     "runs/pretrained)")

  def __post_init__(self):
    super().__post_init__()
    if self.pretrain_steps < 0:
      raise UsageError("--pretrain-steps must be >= 0")
    if self.pretrain_steps and self.model is not None:
      raise UsageError("--pretrain-steps is for the random-init model; --model is pretrained "
                       "already")
    if self.layerwise and not self.scan_layers:
      raise UsageError("--layerwise updates the layer stack inside its backward scan: add "
                       "--scan-layers")
    if not 0 < self.eval_fraction < 1:
      raise UsageError("--eval-fraction must be between 0 and 1")
    if self.model is not None and not (pathlib.Path(self.model) / "config.json").is_file():
      raise UsageError(f"--model {self.model} has no config.json; pass the directory of a "
                       f"Hugging Face {self.MODEL} checkpoint")

  def model_options(self) -> dict:
    """The model constructor's options given on the command line (dtypes, remat, scan)."""
    return dict(param_dtype=self.param_dtype, dtype=self.dtype, remat=self.remat,
                scan_layers=self.scan_layers)
