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

The runner and the tables are ``benchmarks/ablation.py``'s (``--study adarankgrad`` there runs the
same study).

    python -m benchmarks.adarankgrad_ablation            # 200 steps per run, seeds 0 1
    python -m benchmarks.adarankgrad_ablation --quick    # 2-layer models, 20 steps, seed 0
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from benchmarks import ablation

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


def header(t: dict, result: dict) -> str:
  return (f"{t['task']}: {result['steps']} steps, max rank {t.get('rank', '?')}, seeds "
          f"{', '.join(map(str, result['seeds']))} (mean ± std), options "
          f"`{' '.join(t.get('options', []))}`:")


STUDY = ablation.Study(
    name="adarankgrad_ablation", description=__doc__,
    variants={name: ablation.Variant(opt, tuple(options)) for name, (opt, options) in VARIANTS.items()},
    tasks=("roberta", "llama"), seeds=(0, 1),
    metrics=lambda out: {"mean_rank": mean_rank(out)},
    columns=(ablation.Column("mean effective rank", "mean_rank", ".2f"),), header=header)


def main(argv: Sequence[str] | None = None) -> dict:
  return ablation.run(STUDY, argv, "python -m benchmarks.adarankgrad_ablation")


if __name__ == "__main__":
  main()
