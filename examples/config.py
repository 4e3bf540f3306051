"""Configuration and command line of the fine-tuning examples.

A script's options are the fields of a dataclass (:class:`TrainConfig` and the script's own
subclass); :func:`parse_config` turns each field into a ``--field-name`` option with the field's
help text. :func:`launch` is what a script's ``main`` does: say what it builds, check the run
directory and the mesh, build the task, train.

This module imports no JAX (nor Flax): a script prints its first line before the few seconds the
heavy imports take.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

OPTIMIZERS = ("adamw", "adamw_layers", "badam", "badam_ratio", "adarankgrad", "galore", "lora")
# Optimizers whose update is per leaf (optax_memopt.make_layerwise_step applies them layer by layer).
LAYERWISE_OPTIMIZERS = ("adamw", "adarankgrad")
# Chosen on the default tasks (200-step runs, see benchmarks/RESULTS.md): full AdamW learns the RoBERTa
# task at 1e-3 and stalls at the majority class at 3e-3; the block, projected and adapter methods
# change fewer directions per step and want 3e-3 (GaLore and AdaRankGrad at 1e-3 reach a clearly
# higher Llama loss).
DEFAULT_LEARNING_RATES = {"adamw": 1e-3, "adamw_layers": 1e-3, "galore": 3e-3, "adarankgrad": 3e-3,
                          "badam": 3e-3, "badam_ratio": 3e-3, "lora": 3e-3}
FINAL_LOSS_STEPS = 10  # the "final train loss" is the mean over this many last steps


class UsageError(Exception):
  """A problem with the user's input; the scripts print it as one line and exit."""


class Interrupted(Exception):
  """Training stopped on Ctrl-C after saving a checkpoint at ``step``."""

  def __init__(self, step: int):
    super().__init__(f"interrupted at step {step}; continue with --resume")
    self.step = step


def field(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - argparse's name
  """A config field with its help text (shown by ``--help``)."""
  return dataclasses.field(default=default, metadata={"help": help, **kwargs})


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
  resume: bool = field(False, "continue from the latest checkpoint in the run directory")
  overwrite: bool = field(False, "replace the checkpoints of an earlier run in the run directory "
                          "(without it, a run refuses to start over them)")
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


# ---------------------------------------------------------------------------------------------
# Where a run writes.


def output_dir(cfg: TrainConfig) -> pathlib.Path:
  """``--out``, else ``runs/<name>`` (``runs/<name>-compare`` for ``--compare``)."""
  if cfg.out:
    return pathlib.Path(cfg.out)
  return pathlib.Path("runs") / (f"{cfg.name}-compare" if cfg.compare_list else cfg.name)


def run_dirs(cfg: TrainConfig) -> dict[str, pathlib.Path]:
  """Optimizer -> its run directory: the output directory, or one subdirectory per compared run."""
  out = output_dir(cfg)
  if not cfg.compare_list:
    return {cfg.optimizer: out}
  return {name: out / name for name in cfg.compare_list}


def export_dir(cfg: TrainConfig, optimizer: str) -> pathlib.Path | None:
  """Where the Hugging Face checkpoint of ``optimizer``'s run goes, or None (no export)."""
  if cfg.export:
    base = pathlib.Path(cfg.export)
    return base / optimizer if cfg.compare_list else base
  if getattr(cfg, "model", None):  # fine-tuning a checkpoint: the result is one too
    return run_dirs(cfg)[optimizer] / "hf"
  return None


# ---------------------------------------------------------------------------------------------
# Command line.


def _arg_type(annotation: Any):
  """(python type, is_bool) of a field annotation such as ``int``, ``str | None``."""
  if isinstance(annotation, str):
    annotation = eval(annotation, vars(typing) | {"types": types})  # noqa: S307 - our annotations
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  base = args[0] if args else annotation
  return base, base is bool


class _HelpFormatter(argparse.HelpFormatter):
  """Appends ``(default: X)`` unless there is no default or the help text already names it."""

  def _get_help_string(self, action):
    text = action.help or ""
    if ("%(default)" in text or "default" in text or action.default in (None, "")
        or action.default is argparse.SUPPRESS or not action.option_strings):
      return text
    return text + " (default: %(default)s)"


def parse_config(cls: type, argv: Sequence[str] | None, description: str):
  """Builds ``cls`` from ``--field-name value`` overrides; every field of ``cls`` is an option."""
  parser = argparse.ArgumentParser(description=(description.strip().splitlines() or [""])[0],
                                   formatter_class=_HelpFormatter)
  for f in dataclasses.fields(cls):
    kind, is_bool = _arg_type(f.type)
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    if f.name != "learning_rate":  # argparse formats help with %; that one is escaped already
      help_text = help_text.replace("%", "%%")
    if is_bool:
      parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                          default=f.default, help=help_text)
    else:
      parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text,
                          metavar=f.name.upper())
  cfg = cls(**vars(parser.parse_args(argv)))
  if cfg.cpu_devices:
    import jax

    try:
      jax.config.update("jax_num_cpu_devices", cfg.cpu_devices)
    except RuntimeError:
      raise UsageError("--cpu-devices must be set before JAX starts (it cannot change the devices "
                       "of a running process)") from None
  return cfg


def main_guard(main: Callable[[Sequence[str] | None], Any]):
  """Ends a script on bad input or Ctrl-C with one line and a non-zero status (no traceback)."""

  @functools.wraps(main)
  def wrapped(argv=None):
    try:
      return main(argv)
    except UsageError as e:
      raise SystemExit(f"error: {e}") from None
    except Interrupted as e:
      raise SystemExit(str(e)) from None
    except KeyboardInterrupt:  # outside the training loop (data, compilation, generation)
      raise SystemExit("interrupted; nothing saved since the last checkpoint") from None

  return wrapped


def launch(cfg: TrainConfig, what: str, build_task: Callable[[Any], Any]) -> list[dict]:
  """A script's job: say what is built, check outputs and mesh, build the task, train.

  Args:
    cfg: the parsed config.
    what: the model and data, e.g. "a random-init Llama (4 layers) on ...".
    build_task: ``cfg -> training.Task`` (data, tokenizer, model factory, loss).

  Returns:
    The summary of each run (see :func:`examples.training.run`).
  """
  runs = ", ".join(cfg.compare_list) or cfg.optimizer
  print(f"{cfg.name}: fine-tuning {what} with {runs} for {cfg.steps} steps, "
        f"into {output_dir(cfg)}", flush=True)
  from examples import checkpoints

  checkpoints.check_run_dirs(cfg, run_dirs(cfg))  # before any slow work
  from examples import placement, training  # JAX and Flax: a few seconds to import

  mesh = placement.check_mesh(cfg)
  if mesh is not None:
    print(f"sharded over a {' x '.join(f'{k}={v}' for k, v in mesh.shape.items())} mesh of "
          f"{mesh.size} devices (FSDP over data, tensor parallel over model)", flush=True)
  return training.run(cfg, build_task(cfg))
