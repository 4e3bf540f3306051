"""The command line: options from a config dataclass's fields, and :func:`launch`, a script's job.

:func:`parse_config` turns each field of a script's ``Config`` into a ``--field-name`` option
with the field's help text and default (and, for ``--resume``, restores the options recorded in
the run directory, ``examples/rundir.py``). :func:`launch` is what a script's ``main`` does: say
what it builds, check the run directory and the mesh, record the options (``config.json``), build
the task, train (``examples/training.py``, imported only then: JAX takes seconds to import).

This module imports no JAX at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from examples import rundir
from examples.config import TrainConfig, flag
from examples.errors import UsageError, check_interrupted, defer_ctrl_c

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

  With ``--resume``, the options recorded in the run directory (``config.json``) are restored:
  an option given on the command line must agree with the record, except those of
  :data:`examples.rundir.RESUMABLE_OPTIONS` (e.g. ``--steps`` to extend a run), whose new value is
  taken.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  options = vars(_parser(cls, description).parse_args(argv))
  if options["resume"]:  # the recorded options first: the given ones may be valid only with them
    given = vars(_parser(cls, description, defaults=False).parse_args(argv))
    out = rundir.default_output_dir(options["out"], options["name"], options["compare"])
    options = rundir.resumed_options(cls, options, given, out / rundir.RUN_CONFIG)
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
        f"into {rundir.output_dir(cfg)}", flush=True)
  if cfg.layerwise:
    print("layer-wise: the optimizer runs inside the backward pass, layer by layer; global-norm "
          "clipping is off (it needs the whole gradient)", flush=True)
  elif cfg.clip_norm <= 0:
    print("no global-norm clipping (--clip-norm 0)", flush=True)
  from examples import checkpoints

  finished = checkpoints.check_run_dirs(cfg, rundir.run_dirs(cfg))  # before any slow work
  if finished is not None:
    return finished
  with defer_ctrl_c():  # a KeyboardInterrupt inside an import can break the import machinery
    from examples import placement, training  # JAX and Flax: a few seconds to import
  check_interrupted()
  mesh = placement.check_mesh(cfg)
  if mesh is not None:
    print(f"sharded over a {' x '.join(f'{k}={v}' for k, v in mesh.shape.items())} mesh of "
          f"{mesh.size} devices (FSDP over data, tensor parallel over model)", flush=True)
  # Never vouch for an older run: a resumed run without a record gets none.
  if not cfg.resume or (rundir.output_dir(cfg) / rundir.RUN_CONFIG).is_file():
    rundir.write_run_config(cfg, pathlib.Path(inspect.getfile(build_task)).name)
  task = build_task(cfg)
  check_interrupted()
  return training.run(cfg, task)
