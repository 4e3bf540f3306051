"""AdaRankGrad's unpublished defaults, ablated on the examples' tasks.

The paper publishes no values for the information threshold ``eta`` (the fraction of a gradient's
energy the adaptive rank keeps), the convergence threshold that triggers a subspace refresh, or
whether the moment transformation pays off in practice. This script trains the examples' tasks
(``examples/finetune_roberta.py`` and ``examples/finetune_llama.py``, random-init models on the
offline data) with AdaRankGrad under each setting, same data, seed, steps and maximum rank, next to
GaLore at the same rank, and reports final train loss, eval loss (and accuracy), and the mean
effective rank over the run.

    python -m benchmarks.adarankgrad_ablation            # 200 steps per run
    python -m benchmarks.adarankgrad_ablation --quick    # 2-layer models, 20 steps
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
    "galore (rank = max rank)": ("galore", []),
    "adarankgrad defaults (eta 0.9)": ("adarankgrad", []),
    "eta 0.99": ("adarankgrad", ["--info-threshold", "0.99"]),
    "eta 1.0 (rank = max rank)": ("adarankgrad", ["--info-threshold", "1.0"]),
    "eta 1.0, moments reset at refresh": ("adarankgrad", ["--info-threshold", "1.0",
                                                          "--no-moment-transform"]),
    "eta 1.0, refresh threshold 0.8": ("adarankgrad", ["--info-threshold", "1.0",
                                                       "--refresh-threshold", "0.8"]),
    "min rank 4": ("adarankgrad", ["--min-rank", "4"]),
    "min rank 8": ("adarankgrad", ["--min-rank", "8"]),
    "min rank 16 (= max rank)": ("adarankgrad", ["--min-rank", "16"]),
    "refresh threshold 0.25": ("adarankgrad", ["--refresh-threshold", "0.25"]),
    "min rank 8, refresh threshold 0.25": ("adarankgrad", ["--min-rank", "8",
                                                           "--refresh-threshold", "0.25"]),
    "eta 1.0, refresh threshold 0.25": ("adarankgrad", ["--info-threshold", "1.0",
                                                        "--refresh-threshold", "0.25"]),
}


def mean_rank(out: pathlib.Path) -> float:
  """Mean of the effective ranks logged over the run (``nan`` for GaLore)."""
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  ranks = [r["rank"] for r in rows if "rank" in r]
  return float(np.mean(ranks)) if ranks else float("nan")


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bc.add_output_args(parser, "adarankgrad_ablation")
  parser.add_argument("--tasks", nargs="*", default=["roberta", "llama"],
                      choices=tuple(convergence.TASKS))
  parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=tuple(VARIANTS))
  parser.add_argument("--steps", type=int, default=None, help="default 200 (--quick: 20)")
  args = parser.parse_args(argv)
  steps = args.steps or (20 if args.quick else 200)
  env = bc.environment()
  start = time.perf_counter()
  runs_dir = pathlib.Path(tempfile.mkdtemp(prefix="ablation_"))
  result = {"benchmark": "adarankgrad_ablation", "quick": args.quick, "environment": env,
            "steps": steps, "tasks": []}
  for name in args.tasks:
    module = convergence.TASKS[name]
    base = convergence.task_options(name, steps, 8 if args.quick else 16, args.quick)
    task = None
    rows = []
    for variant in args.variants:
      optimizer, extra = VARIANTS[variant]
      out = runs_dir / name / str(len(rows))
      cfg = config.parse_config(module.Config, base + extra + ["--out", str(out)],
                                module.__doc__.splitlines()[0])
      task = task or module.build_task(cfg)  # same data and tokenizer for every variant
      summary = training.train(cfg, task, optimizer, out)
      rows.append({"variant": variant, "optimizer": optimizer, "options": extra,
                   "mean_rank": mean_rank(out), **summary})
      print(f"{name}/{variant}: final loss {summary['final_loss']:.4f}", flush=True)
    result["tasks"].append({"task": name, "rank": cfg.rank, "rows": rows})
    bc.write_json(args.out, result | {"complete": False})
  result["wall_s"] = time.perf_counter() - start
  result["complete"] = True
  parts = [bc.environment_header(env)]
  for t in result["tasks"]:
    has_acc = any("eval_accuracy" in r for r in t["rows"])
    parts.append(f"{t['task']}: {steps} steps, max rank {t['rank']}:")
    parts.append(bc.markdown_table(
        ["variant", "final train loss", "eval loss"] + (["eval accuracy"] if has_acc else [])
        + ["mean effective rank"],
        [[r["variant"], f"{r['final_loss']:.4f}", f"{r.get('eval_loss', float('nan')):.4f}"]
         + ([f"{r.get('eval_accuracy', float('nan')):.3f}"] if has_acc else [])
         + ["" if np.isnan(r["mean_rank"]) else f"{r['mean_rank']:.2f}"] for r in t["rows"]]))
  result["table"] = "\n\n".join(parts)
  bc.write_json(args.out, result)
  print(result["table"])
  return result


if __name__ == "__main__":
  main()
