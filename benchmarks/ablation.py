"""Ablations on the convergence benchmark's tasks: variants x seeds, mean ± std over the seeds.

A *study* is a set of variants (rows). A variant is an optimizer with extra example options and,
optionally, its own length (a multiple of the study's steps), BAdam block-epochs (``switch_every``
is chosen from the run's steps and the blocks its options give, as ``benchmarks/convergence.py``
does), learning rate (a multiple of the rate the benchmark uses) and pretraining (a multiple of
the benchmark's pretraining steps). Each task's runs are the examples' own
(``examples/finetune_roberta.py``, ``examples/finetune_llama.py``, with the options of
:func:`benchmarks.convergence.task_options`): the task is built once per seed (and per
pretraining; a variant's other options must not change the data or the model) and every variant of
that seed is trained on it by ``examples/training.py``. The tables give the final train loss, the
held-out loss (and accuracy) and the study's own columns as mean ± std over the seeds, and where a
row names a reference row, its held-out loss over the reference's, paired by seed.

The studies (each also its own module, which documents it):

* ``badam`` (``benchmarks/badam_ablation.py``): BAdam's gap to AdamW, ablated;
* ``adarankgrad`` (``benchmarks/adarankgrad_ablation.py``): AdaRankGrad's defaults, ablated.

    python -m benchmarks.ablation --study badam
    python -m benchmarks.ablation --study adarankgrad --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from benchmarks import _common as bc
from benchmarks import convergence
from examples import cli, optimizers, training

STUDIES = {"badam": "benchmarks.badam_ablation", "adarankgrad": "benchmarks.adarankgrad_ablation"}
# Options of each run recorded with its figures (what the run was given, after the variant's).
RECORDED = ("seed", "steps", "switch_every", "learning_rate", "warmup_steps", "batch_size",
            "always_active_head", "always_active", "reset_always_active", "pretrain_steps",
            "projection", "min_rank", "info_threshold", "refresh_threshold", "moment_transform")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of a study: ``optimizer`` with the example options ``options``.

  Attributes:
    optimizer: one of the examples' optimizers.
    options: extra example options (an explicit ``--learning-rate`` or ``--switch-every`` wins
      over the study's).
    steps_factor: the run's steps as a multiple of the study's (``switch_every`` follows, so that
      BAdam keeps its block-epochs).
    block_epochs: BAdam's block-epochs in the run (default: the benchmark's).
    lr_factor: the peak learning rate as a multiple of the study's rate for ``optimizer`` (the
      sweep's choice where the study uses it, else the examples' default).
    pretrain_factor: a pretrained task's pretraining steps as a multiple of the study's (a task of
      its own, pretrained once and cached by the examples).
    reference: the row whose held-out loss (same task and seed) this row's is divided by.
    tasks: the tasks the row applies to (``None``: all); it is left out of the others.
  """

  optimizer: str
  options: tuple[str, ...] = ()
  steps_factor: int = 1
  block_epochs: int | None = None
  lr_factor: float = 1.0
  pretrain_factor: int = 1
  reference: str | None = None
  tasks: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Column:
  """A study's own column: the per-seed figure ``key`` (from ``Study.metrics``), formatted ``spec``."""

  header: str
  key: str
  spec: str


@dataclasses.dataclass(frozen=True)
class Study:
  """What a study runs and how its tables read.

  Attributes:
    name: the JSON's name (``benchmarks/results/<name>.json``) and its ``benchmark`` field.
    description: the command line's description (the study module's docstring).
    variants: row name -> :class:`Variant`, in table order.
    tasks: the default tasks (keys of ``convergence.TASKS``).
    seeds: the default seeds (``--quick``: the first).
    steps: the default steps of a run (``--quick``: ``quick_steps``).
    swept_rates: run at the rates the convergence benchmark's sweep chose
      (``convergence_sweep.json``, as ``benchmarks/convergence.py`` does), else the examples'
      defaults.
    model_seed: the examples' seed of the task (split, tokenizer, pretraining, initialisation)
      shared by every fine-tuning seed, as the convergence benchmark; ``None``: each seed builds
      its own task with its seed.
    settings: show each row's optimizer, steps, ``switch_every`` and rate (rows differ in them).
    metrics: ``run directory -> {key: figure}``, extra per-run figures for ``columns``.
    columns: the study's own columns, after the held-out figures.
    header: ``(task entry, result) -> str``, the line above a task's table.
    note: a paragraph under the tables (``RESULTS.md`` shows it), e.g. what the rows change.
  """

  name: str
  description: str
  variants: dict[str, Variant]
  tasks: tuple[str, ...]
  seeds: tuple[int, ...]
  steps: int = 200
  quick_steps: int = 20
  swept_rates: bool = False
  model_seed: int | None = None
  settings: bool = False
  metrics: Callable[[pathlib.Path], dict] | None = None
  columns: tuple[Column, ...] = ()
  header: Callable[[dict, dict], str] | None = None
  note: str = ""


# ---------------------------------------------------------------------------------------------
# Tables.


def _pm(values: Sequence[float | None], spec: str) -> str:
  v = np.array([x for x in values if x is not None and not np.isnan(x)], float)
  if not len(v):
    return ""
  return f"{v.mean():{spec}} ± {(v.std(ddof=1) if len(v) > 1 else 0.0):{spec}}"


def ratios(t: dict, row: dict) -> list[float]:
  """``row``'s held-out loss over its reference row's, per seed the two share."""
  ref = next((r for r in t["rows"] if r["variant"] == row.get("reference")), None)
  if ref is None:
    return []
  by_seed = {s["seed"]: s["eval_loss"] for s in ref["seeds"]}
  return [s["eval_loss"] / by_seed[s["seed"]] for s in row["seeds"] if s["seed"] in by_seed]


def _setting(row: dict) -> list[str]:
  k = ""
  if optimizers.get(row["optimizer"]).switches and row.get("switch_every"):
    k = str(row["switch_every"]) + (f" ({row['block_epochs']:.1f})" if row.get("block_epochs")
                                    else "")
  lr = row.get("learning_rate")
  return [row["optimizer"], str(row["steps"]), k, f"{lr:g}" if lr else "default"]


def task_table(study: Study, t: dict) -> str:
  rows = t["rows"]
  has_acc = any("eval_accuracy" in s for r in rows for s in r["seeds"])
  pretrain = study.settings and len({r.get("pretrain_steps") for r in rows}) > 1
  refs = any(r.get("reference") for r in rows)
  headers = ["variant"]
  if study.settings:
    headers += ["optimizer", "steps", "switch_every (block-epochs)", "peak lr"]
    headers += ["pretraining steps"] if pretrain else []
  headers += ["final train loss", "held-out loss"] + (["held-out accuracy"] if has_acc else [])
  headers += [c.header for c in study.columns]
  headers += ["held-out loss / reference's (same seed)", "reference"] if refs else []
  out = []
  for r in rows:
    def per_seed(k, r=r):
      return [s.get(k) for s in r["seeds"]]

    cells = [r["variant"]]
    if study.settings:
      cells += _setting(r) + ([str(r.get("pretrain_steps") or "")] if pretrain else [])
    cells += [_pm(per_seed("final_loss"), ".4f"), _pm(per_seed("eval_loss"), ".4f")]
    cells += [_pm(per_seed("eval_accuracy"), ".3f")] if has_acc else []
    cells += [_pm(per_seed(c.key), c.spec) for c in study.columns]
    if refs:
      cells += [_pm(ratios(t, r), ".3f"), r.get("reference") or ""]
    out.append(cells)
  return bc.markdown_table(headers, out)


def default_header(t: dict, result: dict) -> str:
  return (f"{t['task']}: seeds {', '.join(map(str, result['seeds']))} (mean ± std), options "
          f"`{' '.join(t.get('options', []))}`:")


def tables(study: Study, result: dict) -> str:
  header = study.header or default_header
  parts = [bc.environment_header(result["environment"])]
  for t in result["tasks"]:
    parts += [header(t, result), task_table(study, t)]
    if t.get("left_out"):
      parts.append(f"Left out on {t['task']} (not applicable): {', '.join(t['left_out'])}.")
  return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Running.


def _row(name: str, variant: str, v: Variant, steps: int, batch_size: int, quick: bool,
         extra: Sequence[str], pretrain_steps: int | None, lrs: dict | None) -> dict:
  """A row's options and settings on task ``name`` (before any run)."""
  steps = steps * v.steps_factor
  pretrain = None
  if name in convergence.PRETRAINED:
    pretrain = (pretrain_steps or convergence.PRETRAIN_STEPS["quick" if quick else "full"][name])
    pretrain *= v.pretrain_factor
  options = convergence.task_options(name, steps, batch_size, quick, pretrain_steps=pretrain,
                                     extra=list(extra) + list(v.options),
                                     block_epochs=v.block_epochs or convergence.BLOCK_EPOCHS)
  lr, source = None, "default"
  if lrs is not None:
    lr, source = lrs[v.optimizer]["lr"] * v.lr_factor, lrs[v.optimizer]["source"]
  elif v.lr_factor != 1.0:
    lr = optimizers.get(v.optimizer).learning_rate * v.lr_factor
  if v.lr_factor != 1.0:
    source += f" x {v.lr_factor:g}"
  return {"variant": variant, "optimizer": v.optimizer, "options": list(v.options),
          "config_overrides": options, "steps": steps, "pretrain_steps": pretrain,
          "learning_rate": float(f"{lr:.3g}") if lr else None, "lr_source": source,
          "reference": v.reference, "seeds": []}


def reusable_runs(paths: Sequence[pathlib.Path]) -> dict:
  """``(task, variant, options, seed, learning rate) -> {"seed": per-seed entry, "row": the row's
  block figures}`` of earlier results (``--reuse``)."""
  found = {}
  for path in paths:
    for t in json.loads(pathlib.Path(path).read_text())["tasks"]:
      for r in t["rows"]:
        row = {k: r[k] for k in ("switch_every", "blocks", "block_epochs") if k in r}
        for s in r["seeds"]:
          lr = s.get("config", {}).get("learning_rate")
          found[(t["task"], r["variant"], tuple(r.get("config_overrides", ())), s["seed"], lr)] = {
              "seed": {k: v for k, v in s.items() if k != "reused"}, "row": row}
  return found


def run(study: Study, argv: Sequence[str] | None, command: str) -> dict:
  """Runs ``study`` with the command line ``argv`` of ``command`` (e.g. ``python -m
  benchmarks.ablation --study badam``, recorded with ``argv`` in the JSON); writes and returns the
  result."""
  argv = list(argv) if argv is not None else sys.argv[1:]
  parser = argparse.ArgumentParser(prog=command, description=study.description.splitlines()[0])
  bc.add_output_args(parser, study.name)
  parser.add_argument("--tasks", nargs="*", default=list(study.tasks),
                      choices=tuple(convergence.TASKS))
  parser.add_argument("--variants", nargs="*", default=list(study.variants),
                      choices=tuple(study.variants), metavar="VARIANT",
                      help="rows to run (default: all): " + "; ".join(study.variants))
  parser.add_argument("--seeds", type=int, nargs="*", default=None,
                      help=f"default {' '.join(map(str, study.seeds))} (--quick: {study.seeds[0]})")
  parser.add_argument("--steps", type=int, default=None,
                      help=f"steps of a run (default {study.steps}; --quick: {study.quick_steps}); "
                      "a variant may run a multiple of them")
  parser.add_argument("--pretrain-steps", type=int, default=None,
                      help="AdamW pretraining steps of the *-pretrained tasks (default: the "
                      "convergence benchmark's); a variant may pretrain a multiple of them")
  parser.add_argument("--model-seed", type=int,
                      default=-1 if study.model_seed is None else study.model_seed,
                      help="the examples' seed of each task's split, tokenizer, pretraining and "
                      "initialisation, shared by all seeds (-1: each seed its own)")
  if study.swept_rates:
    parser.add_argument("--learning-rates", type=pathlib.Path, default=convergence.SWEEP_OUT,
                        help="the sweep JSON whose chosen rates the rows use (default "
                        f"{convergence.SWEEP_OUT.name}; a rate it lacks: the examples' default)")
  parser.add_argument("--task-args", default="",
                      help="extra example options for every run, e.g. '--num-layers 2'")
  parser.add_argument("--runs-dir", type=pathlib.Path, default=None,
                      help="where the examples' run directories go (default: a temporary one)")
  parser.add_argument("--reuse", type=pathlib.Path, nargs="*", default=[],
                      help="earlier result JSONs of this study (complete or stopped): their runs "
                      "with the same task, variant, options, seed and learning rate are taken from "
                      "there instead of being run again (to continue a stopped run, or to merge "
                      "runs of separate processes)")
  args = parser.parse_args(argv)
  earlier = reusable_runs(args.reuse)
  steps = args.steps or (study.quick_steps if args.quick else study.steps)
  seeds = args.seeds if args.seeds is not None else list(study.seeds[:1] if args.quick
                                                         else study.seeds)
  batch_size = 8 if args.quick else 16
  model_seed = None if args.model_seed < 0 else args.model_seed
  env = bc.environment()
  start = time.perf_counter()
  runs_dir = args.runs_dir or pathlib.Path(tempfile.mkdtemp(prefix="ablation_"))
  result = {"benchmark": study.name, "quick": args.quick, "environment": env,
            "command": " ".join([command, *map(shlex.quote, argv)]),
            "steps": steps, "seeds": seeds, "model_seed": model_seed, "tasks": [],
            "reused": [str(p) for p in args.reuse]}
  if study.note:
    result["note"] = study.note

  def save(complete: bool) -> None:
    result["complete"] = complete
    result["table"] = tables(study, result)
    bc.write_json(args.out, result)

  for name in args.tasks:
    module = convergence.TASKS[name]
    extra = args.task_args.split()
    lrs = None
    if study.swept_rates:
      lrs = convergence.learning_rates(args.learning_rates, name,
                                       sorted({v.optimizer for v in study.variants.values()}))
      result["learning_rates_from"] = (str(args.learning_rates)
                                       if args.learning_rates.is_file() else None)
    chosen = [v for v in args.variants
              if study.variants[v].tasks is None or name in study.variants[v].tasks]
    rows = [_row(name, v, study.variants[v], steps, batch_size, args.quick, extra,
                 args.pretrain_steps, lrs) for v in chosen]
    base = convergence.task_options(name, steps, batch_size, args.quick,
                                    pretrain_steps=args.pretrain_steps, extra=extra)
    entry = {"task": name, "options": base, "learning_rates": lrs, "rows": rows,
             "left_out": [v for v in args.variants if v not in chosen]}
    result["tasks"].append(entry)
    built_tasks: dict[tuple, training.Task] = {}
    for seed in seeds:
      built = seed if model_seed is None else model_seed
      if model_seed is None:
        built_tasks.clear()  # the previous seed's task is not used again
      for i, row in enumerate(rows):
        out = runs_dir / name / str(seed) / str(i)
        cfg = cli.parse_config(module.Config, row["config_overrides"] + [
            "--seed", str(built), "--out", str(out)], module.__doc__.splitlines()[0])
        entry["rank"] = cfg.rank
        lr = cfg.learning_rate or row["learning_rate"]  # the variant's --learning-rate wins
        if cfg.learning_rate:
          row["learning_rate"], row["lr_source"] = cfg.learning_rate, "option"
        found = earlier.get((name, row["variant"], tuple(row["config_overrides"]), seed, lr))
        if found is not None:
          row.update(found["row"])
          row["seeds"].append(found["seed"] | {"reused": True})
          continue
        # One task per seed and pretraining: every row fine-tunes the same data and weights.
        key = (built, getattr(cfg, "pretrain_steps", 0))
        if key not in built_tasks:
          built_tasks[key] = module.build_task(cfg)
        task = built_tasks[key]
        cfg = dataclasses.replace(cfg, seed=seed, learning_rate=lr)
        if optimizers.get(row["optimizer"]).switches and "blocks" not in row:
          row["switch_every"] = cfg.switch_every
          row["blocks"] = convergence.count_blocks(task, cfg)
          row["block_epochs"] = cfg.steps / (cfg.switch_every * row["blocks"])
        summary = training.train(cfg, task, row["optimizer"], out)
        figures = study.metrics(out) if study.metrics else {}
        row["seeds"].append({"seed": seed, **figures, **summary,
                             "config": {k: getattr(cfg, k) for k in RECORDED if hasattr(cfg, k)}})
        print(f"{name}/seed {seed}/{row['variant']}: final loss {summary['final_loss']:.4f}, "
              f"eval loss {summary['eval_loss']:.4f}"
              + (f", accuracy {summary['eval_accuracy']:.3f}" if "eval_accuracy" in summary else ""),
              flush=True)
        save(False)
    for row in rows:
      row["ratios"] = ratios(entry, row)
  result["wall_s"] = time.perf_counter() - start
  save(True)
  print(result["table"])
  return result


def main(argv: Sequence[str] | None = None) -> dict:
  import importlib

  argv = list(argv) if argv is not None else sys.argv[1:]
  parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation",
                                   description=__doc__.splitlines()[0], add_help=False)
  parser.add_argument("--study", choices=tuple(STUDIES), required=True,
                      help="the study; its options: --study NAME --help")
  known, rest = parser.parse_known_args(argv)
  module = importlib.import_module(STUDIES[known.study])
  return run(module.STUDY, rest, f"python -m benchmarks.ablation --study {known.study}")


if __name__ == "__main__":
  main()
