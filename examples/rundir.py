"""Where a run writes, and the record of its options that ``--resume`` restores.

A run directory is ``--out`` (default ``runs/<name>``, ``runs/<name>-compare`` for ``--compare``,
with one subdirectory per compared optimizer). It holds ``config.json`` (:data:`RUN_CONFIG`: the
options the run was made with, :func:`write_run_config`), which :func:`resumed_options` restores
for ``--resume``; the checkpoints, metrics and exports are ``examples/checkpoints.py``'s and
``examples/reporting.py``'s.

This module imports no JAX.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib
from typing import Any

from examples.config import TrainConfig, flag
from examples.errors import UsageError

RUN_CONFIG = "config.json"  # the options a run was made with, in its run directory
# Options of one invocation: neither recorded in a run's config.json nor restored by --resume.
INVOCATION_OPTIONS = ("resume", "overwrite", "stop_at", "cpu_devices", "out")
# Options a resumed run may change (the new value is recorded): they change how long it trains,
# what it logs, saves and exports, or where it runs, not what each step computes.
RESUMABLE_OPTIONS = ("steps", "eval_every", "log_every", "checkpoint_every", "export", "gen_tokens",
                     "mesh")


def output_dir(cfg: TrainConfig) -> pathlib.Path:
  """``--out``, else ``runs/<name>`` (``runs/<name>-compare`` for ``--compare``)."""
  return default_output_dir(cfg.out, cfg.name, cfg.compare)


def default_output_dir(out: str | None, name: str, compare: str) -> pathlib.Path:
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


def _option_text(name: str, value: Any) -> str:
  if isinstance(value, bool):
    return flag(name) if value else "--no-" + flag(name)[2:]
  return f"{flag(name)} {value}"


def resumed_options(cls: type, options: dict, given: dict, path: pathlib.Path) -> dict:
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
