"""Configuration and command line of the fine-tuning examples.

A script's options are the fields of a dataclass (:class:`TrainConfig` and the script's own
subclass); :func:`parse_config` turns each field into a ``--field-name`` option with the field's
help text (and, for ``--resume``, restores the options recorded in the run directory).
:func:`launch` is what a script's ``main`` does: say what it builds, check the run directory and
the mesh, record the options (``config.json``), build the task, train. :func:`main_guard` and
:func:`run_script` end a script on bad input or Ctrl-C with one line.

This module imports no JAX (nor Flax): a script prints its first line before the few seconds the
heavy imports take.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import pathlib
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

OPTIMIZERS = ("adamw", "adamw_layers", "badam", "badam_ratio", "adarankgrad", "galore", "lora")
# Optimizers whose update is per leaf (optax_memopt.make_layerwise_step applies them layer by layer).
LAYERWISE_OPTIMIZERS = ("adamw", "adarankgrad")
# Defaults for the examples' short runs: full AdamW at a lower rate than the block, projected and
# adapter methods, which change fewer directions per step. The convergence benchmark chooses its own
# rate per optimizer on a validation split (`python -m benchmarks.convergence --sweep`, in
# benchmarks/RESULTS.md).
DEFAULT_LEARNING_RATES = {"adamw": 1e-3, "adamw_layers": 1e-3, "galore": 3e-3, "adarankgrad": 3e-3,
                          "badam": 3e-3, "badam_ratio": 3e-3, "lora": 3e-3}
FINAL_LOSS_STEPS = 10  # the "final train loss" is the mean over this many last steps
MESH_AXES = ("data", "model")  # FSDP over data, tensor parallelism over model (examples/sharding.py)
DTYPES = ("float32", "bfloat16")
RUN_CONFIG = "config.json"  # the options a run was made with, in its run directory
# Options of one invocation: neither recorded in a run's config.json nor restored by --resume.
INVOCATION_OPTIONS = ("resume", "overwrite", "stop_at", "cpu_devices", "out")
# Options a resumed run may change (the new value is recorded): they change how long it trains,
# what it logs, saves and exports, or where it runs, not what each step computes.
RESUMABLE_OPTIONS = ("steps", "eval_every", "log_every", "checkpoint_every", "export", "gen_tokens",
                     "mesh")


class UsageError(Exception):
  """A problem with the user's input; the scripts print it as one line and exit."""


class Interrupted(Exception):
  """Training stopped on Ctrl-C after saving a checkpoint at ``step``."""

  def __init__(self, step: int):
    super().__init__(f"interrupted at step {step}; continue with --resume")
    self.step = step


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


# ---------------------------------------------------------------------------------------------
# Where a run writes.


def output_dir(cfg: TrainConfig) -> pathlib.Path:
  """``--out``, else ``runs/<name>`` (``runs/<name>-compare`` for ``--compare``)."""
  return _output_dir(cfg.out, cfg.name, cfg.compare)


def _output_dir(out: str | None, name: str, compare: str) -> pathlib.Path:
  if out:
    return pathlib.Path(out)
  return pathlib.Path("runs") / (f"{name}-compare" if compare.strip(" ,") else name)


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
  """Appends ``(default: X)`` unless there is no default or the help text already gives it."""

  def _get_help_string(self, action):
    text = action.help or ""
    if ("%(default)" in text or "default:" in text or action.default in (None, "")
        or action.default is argparse.SUPPRESS or not action.option_strings):
      return text
    return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
  """argparse whose errors (an unknown option, ``--steps ten``) are one line (:class:`UsageError`)."""

  def error(self, message):
    raise UsageError(f"{message} (see --help)")


def _parser(cls: type, description: str, *, defaults: bool = True) -> argparse.ArgumentParser:
  """Every field of ``cls`` as ``--field-name``; without ``defaults``, only what argv gives."""
  parser = _Parser(description=(description.strip().splitlines() or [""])[0],
                   formatter_class=_HelpFormatter,
                   argument_default=None if defaults else argparse.SUPPRESS)
  for f in dataclasses.fields(cls):
    kind, is_bool = _arg_type(f.type)
    help_text = f.metadata.get("help", "")
    if f.name != "learning_rate":  # argparse formats help with %; that one is escaped already
      help_text = help_text.replace("%", "%%")
    default = f.default if defaults else argparse.SUPPRESS
    if is_bool:
      parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                          default=default, help=help_text)
    else:
      parser.add_argument(flag(f.name), dest=f.name, type=kind, default=default, help=help_text,
                          metavar=f.name.upper())
  return parser


def parse_config(cls: type, argv: Sequence[str] | None, description: str):
  """Builds ``cls`` from ``--field-name value`` overrides; every field of ``cls`` is an option.

  With ``--resume``, the options recorded in the run directory (:data:`RUN_CONFIG`) are restored:
  an option given on the command line must agree with the record, except those of
  :data:`RESUMABLE_OPTIONS` (e.g. ``--steps`` to extend a run), whose new value is taken.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  options = vars(_parser(cls, description).parse_args(argv))
  if options["resume"]:  # the recorded options first: the given ones may be valid only with them
    given = vars(_parser(cls, description, defaults=False).parse_args(argv))
    out = _output_dir(options["out"], options["name"], options["compare"])
    options = _resumed_options(cls, options, given, out / RUN_CONFIG)
  cfg = cls(**options)
  cfg.options = options  # as given (before __post_init__ adjusts any): what config.json records
  if cfg.cpu_devices:
    import jax

    try:
      jax.config.update("jax_num_cpu_devices", cfg.cpu_devices)
    except RuntimeError:
      raise UsageError("--cpu-devices must be set before JAX starts (it cannot change the devices "
                       "of a running process)") from None
  return cfg


def _option_text(name: str, value: Any) -> str:
  if isinstance(value, bool):
    return flag(name) if value else "--no-" + flag(name)[2:]
  return f"{flag(name)} {value}"


def _resumed_options(cls: type, options: dict, given: dict, path: pathlib.Path) -> dict:
  """``options`` with the recorded ones of ``path`` restored; one line for a contradiction."""
  if not path.is_file():
    return options  # a run of an older version (or nothing to resume, which launch says)
  try:
    record = json.loads(path.read_text())
    recorded, script = dict(record["options"]), record["script"]
  except (OSError, ValueError, KeyError, TypeError):
    raise UsageError(f"--resume: {path} is not a run configuration these scripts write; move it "
                     "away to resume with the options given, or start over with --overwrite") from None
  if script != pathlib.Path(inspect.getfile(cls)).name:
    raise UsageError(f"--resume: {path.parent} is a run of {script}; resume it with that script")
  names = {f.name for f in dataclasses.fields(cls)}
  merged = dict(options)
  for name, value in recorded.items():
    if name not in names or name in INVOCATION_OPTIONS:
      continue
    if name in given and given[name] != value:
      if name in RESUMABLE_OPTIONS:
        print(f"--resume: {_option_text(name, given[name])} (the run had "
              f"{_option_text(name, value)}; recorded)", flush=True)
        continue
      raise UsageError(f"--resume: {_option_text(name, given[name])} contradicts the run's "
                       f"{_option_text(name, value)} ({path}); leave it out to continue the run, "
                       "or start a new one with --overwrite or another --out")
    merged[name] = value
  return merged


def write_run_config(cfg: TrainConfig, script: str) -> pathlib.Path:
  """Records ``cfg``'s options in the run directory (``config.json``), for ``--resume``."""
  options = getattr(cfg, "options", None) or dataclasses.asdict(cfg)
  record = {"script": script,
            "options": {k: v for k, v in options.items() if k not in INVOCATION_OPTIONS}}
  path = output_dir(cfg) / RUN_CONFIG
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(record, indent=1) + "\n")
  tmp.replace(path)
  return path


# ---------------------------------------------------------------------------------------------
# Ctrl-C: one line and a non-zero exit at any moment, and never half a checkpoint.


class _CtrlC:
  """What SIGINT does while a script runs (the handler is :func:`main_guard`'s).

  Outside training it raises ``KeyboardInterrupt`` at once (one line, see :func:`main_guard`) and
  also sets ``requested``, which :func:`check_interrupted` checks between the phases of a run, so
  that a Ctrl-C swallowed by library code (JAX's import) still stops it. Inside
  :func:`defer_ctrl_c` (the training loop, checkpoint saves, JAX's import) it only sets
  ``requested``: the training loop stops after the current step and saves a checkpoint, and any
  further Ctrl-C is answered with one line while that finishes (a checkpoint is written whole or
  not at all).
  """

  requested = False
  deferred = False
  said = False

  def handle(self, signum, frame):
    if self.deferred and self.requested:
      if not self.said:
        self.said = True
        print("\nCtrl-C again: stopping at the next safe point (a checkpoint being written is "
              "finished first)", file=sys.stderr, flush=True)
      return
    self.requested = True
    if not self.deferred:
      raise KeyboardInterrupt


CTRL_C = _CtrlC()


def _in_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def check_interrupted() -> None:
  """Raises ``KeyboardInterrupt`` if Ctrl-C was pressed (and swallowed somewhere) since the start."""
  if CTRL_C.requested:
    raise KeyboardInterrupt


@contextlib.contextmanager
def defer_ctrl_c():
  """Within: Ctrl-C only sets ``CTRL_C.requested``, checked afterwards (by the training loop after
  each step, which then saves a checkpoint; by :func:`check_interrupted`).

  Raising ``KeyboardInterrupt`` in the middle of a step could leave donated buffers
  half-consumed (or crash inside XLA), and in the middle of an orbax save a half-written
  checkpoint; stopping between steps lets the loop save a consistent one.
  """
  if not _in_main_thread():
    yield CTRL_C
    return
  previous = signal.signal(signal.SIGINT, CTRL_C.handle)
  was_deferred, CTRL_C.deferred = CTRL_C.deferred, True
  try:
    yield CTRL_C
  finally:
    CTRL_C.deferred = was_deferred
    signal.signal(signal.SIGINT, previous)


def main_guard(main: Callable[[Sequence[str] | None], Any]):
  """Ends a script on bad input or Ctrl-C with one line and a non-zero status (no traceback)."""

  @functools.wraps(main)
  def wrapped(argv=None):
    CTRL_C.requested = CTRL_C.said = False
    previous = signal.signal(signal.SIGINT, CTRL_C.handle) if _in_main_thread() else None
    try:
      return main(argv)
    except UsageError as e:
      raise SystemExit(f"error: {e}") from None
    except Interrupted as e:
      raise SystemExit(str(e)) from None
    except KeyboardInterrupt:  # outside the training loop (data, generation, export)
      raise SystemExit("interrupted; nothing saved since the last checkpoint") from None
    except Exception:
      if CTRL_C.requested:  # the interrupt surfaced as another error (e.g. inside a C extension)
        raise SystemExit("interrupted; nothing saved since the last checkpoint") from None
      raise
    finally:
      CTRL_C.requested = False
      if previous is not None:
        signal.signal(signal.SIGINT, previous)

  return wrapped


def run_script(main: Callable[[], Any]) -> None:
  """A script's ``__main__``: runs ``main``; an interrupted run ends with its one line and exit
  status 130 without the interpreter's shutdown (tearing down JAX's threads in the middle of a
  compilation can crash the process after the line was printed)."""
  try:
    main()
  except SystemExit as e:
    if isinstance(e.code, str) and e.code.startswith("interrupted"):
      print(e.code, file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(130)
    raise


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
  if cfg.layerwise:
    print("layer-wise: the optimizer runs inside the backward pass, layer by layer; global-norm "
          "clipping is off (it needs the whole gradient)", flush=True)
  elif cfg.clip_norm <= 0:
    print("no global-norm clipping (--clip-norm 0)", flush=True)
  from examples import checkpoints

  finished = checkpoints.check_run_dirs(cfg, run_dirs(cfg))  # before any slow work
  if finished is not None:
    return finished
  with defer_ctrl_c():  # a KeyboardInterrupt inside an import can break the import machinery
    from examples import placement, training  # JAX and Flax: a few seconds to import
  check_interrupted()
  mesh = placement.check_mesh(cfg)
  if mesh is not None:
    print(f"sharded over a {' x '.join(f'{k}={v}' for k, v in mesh.shape.items())} mesh of "
          f"{mesh.size} devices (FSDP over data, tensor parallel over model)", flush=True)
  if not cfg.resume or (output_dir(cfg) / RUN_CONFIG).is_file():  # never vouch for an older run
    write_run_config(cfg, pathlib.Path(inspect.getfile(build_task)).name)
  task = build_task(cfg)
  check_interrupted()
  return training.run(cfg, task)
