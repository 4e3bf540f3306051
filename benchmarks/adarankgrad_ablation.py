"""AdaRankGrad's unpublished defaults, ablated on the examples' tasks over seeds.

The paper publishes no values for the information threshold ``eta`` (the fraction of a gradient's
energy the adaptive rank keeps), a floor on the rank, the convergence threshold that triggers a
subspace refresh, or whether the moment transformation pays off in practice. This script trains
the examples' tasks (``examples/finetune_roberta.py`` and ``examples/finetune_llama.py``, the same
settings as ``benchmarks/convergence.py``) with AdaRankGrad under each setting, same data, seeds,
steps and maximum rank, next to GaLore at the same rank, and reports final train loss, held-out
loss (and accuracy) and the mean effective rank over the run, as mean ± std over the seeds.

The previous defaults projected every matrix, the embeddings and heads included, with no rank floor,
and stalled the RoBERTa classifier at the majority class (mean effective rank 1.6). The current
defaults project only the matrices inside the model's layers (embeddings and heads get plain Adam,
as in the papers) with a rank floor of half the maximum rank; the rows vary the projected set,
the rank floor, the information threshold, the refresh threshold and the moment transformation
around them.

    python -m benchmarks.adarankgrad_ablation            # 200 steps per run, seeds 0 1
    python -m benchmarks.adarankgrad_ablation --quick    # 2-layer models, 20 steps, seed 0
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from benchmarks import _common as bc
from benchmarks import convergence
from examples import config, training

# name -> (optimizer, extra example options)
VARIANTS = {
    "galore (rank = max rank), layers": ("galore", []),
    "galore, every matrix": ("galore", ["--projection", "all"]),
    "defaults (layers, eta 0.9, min rank = max rank / 2)": ("adarankgrad", []),
    "previous defaults (every matrix, eta 0.9, min rank 1)": ("adarankgrad", [
        "--projection", "all", "--min-rank", "1"]),
    "layers, eta 0.9, min rank 1": ("adarankgrad", ["--min-rank", "1"]),
    "every matrix, min rank 4": ("adarankgrad", ["--projection", "all", "--min-rank", "4"]),
    "every matrix, min rank 8": ("adarankgrad", ["--projection", "all", "--min-rank", "8"]),
    "every matrix, min rank 16 (= max rank)": ("adarankgrad", ["--projection", "all",
                                                               "--min-rank", "16"]),
    "every matrix, eta 1.0 (rank = max rank)": ("adarankgrad", ["--projection", "all",
                                                                "--info-threshold", "1.0"]),
    "every matrix, eta 0.9, min rank = max rank / 2": ("adarankgrad", ["--projection", "all"]),
    "layers, min rank 4": ("adarankgrad", ["--min-rank", "4"]),
    "layers, eta 0.99, min rank 1": ("adarankgrad", ["--info-threshold", "0.99",
                                                     "--min-rank", "1"]),
    "layers, eta 1.0 (rank = max rank)": ("adarankgrad", ["--info-threshold", "1.0"]),
    "layers, refresh threshold 0.25": ("adarankgrad", ["--refresh-threshold", "0.25"]),
    "layers, moments reset at refresh": ("adarankgrad", ["--no-moment-transform"]),
}


def mean_rank(out: pathlib.Path) -> float:
  """Mean of the effective ranks logged over the run (``nan`` for GaLore)."""
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  ranks = [r["rank"] for r in rows if "rank" in r]
  return float(np.mean(ranks)) if ranks else float("nan")


def _pm(values: Sequence[float | None], spec: str) -> str:
  v = np.array([x for x in values if x is not None and not np.isnan(x)], float)
  if not len(v):
    return ""
  return f"{v.mean():{spec}} ± {(v.std(ddof=1) if len(v) > 1 else 0.0):{spec}}"


def task_table(t: dict) -> str:
  has_acc = any("eval_accuracy" in s for r in t["rows"] for s in r["seeds"])
  rows = []
  for r in t["rows"]:
    per_seed = {k: [s.get(k) for s in r["seeds"]]
                for k in ("final_loss", "eval_loss", "eval_accuracy", "mean_rank")}
    rows.append([r["variant"], _pm(per_seed["final_loss"], ".4f"),
                 _pm(per_seed["eval_loss"], ".4f")]
                + ([_pm(per_seed["eval_accuracy"], ".3f")] if has_acc else [])
                + [_pm(per_seed["mean_rank"], ".2f")])
  return bc.markdown_table(["variant", "final train loss", "held-out loss"]
                           + (["held-out accuracy"] if has_acc else []) + ["mean effective rank"],
                           rows)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bc.add_output_args(parser, "adarankgrad_ablation")
  parser.add_argument("--tasks", nargs="*", default=["roberta", "llama"],
                      choices=tuple(convergence.TASKS))
  parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=tuple(VARIANTS))
  parser.add_argument("--seeds", type=int, nargs="*", default=None,
                      help="default 0 1 (--quick: 0)")
  parser.add_argument("--steps", type=int, default=None, help="default 200 (--quick: 20)")
  parser.add_argument("--task-args", default="",
                      help="extra example options for every run, e.g. '--num-layers 2'")
  args = parser.parse_args(argv)
  steps = args.steps or (20 if args.quick else 200)
  seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
  env = bc.environment()
  start = time.perf_counter()
  runs_dir = pathlib.Path(tempfile.mkdtemp(prefix="ablation_"))
  result = {"benchmark": "adarankgrad_ablation", "quick": args.quick, "environment": env,
            "steps": steps, "seeds": seeds, "tasks": []}
  for name in args.tasks:
    module = convergence.TASKS[name]
    base = convergence.task_options(name, steps, 8 if args.quick else 16,
                                    args.quick) + args.task_args.split()
    rows = [{"variant": v, "optimizer": VARIANTS[v][0], "options": VARIANTS[v][1], "seeds": []}
            for v in args.variants]
    for seed in seeds:
      task = None
      for i, row in enumerate(rows):
        out = runs_dir / name / str(seed) / str(i)
        cfg = config.parse_config(module.Config, base + row["options"] + [
            "--seed", str(seed), "--out", str(out)], module.__doc__.splitlines()[0])
        task = task or module.build_task(cfg)  # same data and init for every variant of a seed
        summary = training.train(cfg, task, row["optimizer"], out)
        row["seeds"].append({"seed": seed, "mean_rank": mean_rank(out), **summary})
        print(f"{name}/seed {seed}/{row['variant']}: final loss {summary['final_loss']:.4f}, "
              f"eval loss {summary['eval_loss']:.4f}", flush=True)
    result["tasks"].append({"task": name, "rank": cfg.rank, "options": base, "rows": rows})
    bc.write_json(args.out, result | {"complete": False})
  result["wall_s"] = time.perf_counter() - start
  result["complete"] = True
  parts = [bc.environment_header(env)]
  for t in result["tasks"]:
    parts.append(f"{t['task']}: {steps} steps, max rank {t['rank']}, seeds "
                 f"{', '.join(map(str, seeds))} (mean ± std), options "
                 f"`{' '.join(t.get('options', []))}`:")
    parts.append(task_table(t))
  result["table"] = "\n\n".join(parts)
  bc.write_json(args.out, result)
  print(result["table"])
  return result


if __name__ == "__main__":
  main()
