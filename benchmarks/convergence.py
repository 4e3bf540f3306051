"""Final loss of each optimizer on the examples' tasks, same data, seed and number of steps.

The tasks are the examples' own, built and trained by ``examples/training.py`` (``build_task`` and
``train``): Llama instruction tuning on the offline pydoc instruction set (loss on the response
tokens), and RoBERTa sequence classification of pydoc paragraphs (three classes). Both models are
small and randomly initialised, so BAdam also trains the embedding and the head (as the examples
do). ``llama-pretrained`` is the papers' setting: the same Llama task, fine-tuning a model that was
first pretrained with AdamW as a language model on the whole Python reference manual
(``--pretrain-steps``; every optimizer starts from the same weights, BAdam's embedding and head
stay frozen). ``badam`` here is the examples' BAdam, trained with the block step (``make_block_step``).
GaLore and AdaRankGrad get the same rank (GaLore's rank, AdaRankGrad's maximum rank).

Writes the final train loss (mean of the last 10 steps), the eval loss (and accuracy) to JSON and
one PNG of the loss curves per task, next to the JSON.

    python -m benchmarks.convergence            # examples' default models, 200 steps per optimizer
    python -m benchmarks.convergence --quick    # 2-layer models, 20 steps
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from collections.abc import Sequence

from benchmarks import _common as bc
from examples import config, finetune_llama, finetune_roberta, reporting, training

TASKS = {"llama": finetune_llama, "llama-pretrained": finetune_llama, "roberta": finetune_roberta}
# "llama-pretrained": the papers' setting, fine-tuning a pretrained model. The random-init Llama is
# first pretrained with AdamW as a language model on the whole Python reference manual (once per
# task; every optimizer starts from the same weights), then instruction-tuned with embedding and
# head frozen for BAdam.
PRETRAIN_STEPS = {"full": 600, "quick": 10}
QUICK_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--intermediate-size", "128",
               "--num-heads", "2", "--max-examples", "400", "--seq-len", "64"]
QUICK_LLAMA = ["--num-kv-heads", "1"]


def _targets(summaries: dict[str, dict]) -> list[dict]:
  """The issue's targets, checked on the final train loss."""
  loss = {k: s["final_loss"] for k, s in summaries.items()}
  out = []
  if {"badam", "adamw"} <= loss.keys():
    gap = loss["badam"] / loss["adamw"] - 1
    out.append({"target": "badam within 5% of adamw's final loss", "value": f"{100 * gap:+.1f}%",
                "met": gap <= 0.05})
    evals = {k: s.get("eval_loss") for k, s in summaries.items()}
    gap = evals["badam"] / evals["adamw"] - 1
    out.append({"target": "badam within 5% of adamw's eval loss (held-out)",
                "value": f"{100 * gap:+.1f}%", "met": gap <= 0.05})
  if {"badam", "lora"} <= loss.keys():
    out.append({"target": "badam better than lora",
                "value": f"{loss['badam']:.3f} vs {loss['lora']:.3f}",
                "met": loss["badam"] < loss["lora"]})
  if {"adarankgrad", "galore"} <= loss.keys():
    out.append({"target": "adarankgrad at least as good as galore (equal max rank)",
                "value": f"{loss['adarankgrad']:.3f} vs {loss['galore']:.3f}",
                "met": loss["adarankgrad"] <= loss["galore"]})
  return out


def task_options(name: str, steps: int, batch_size: int, quick: bool) -> list[str]:
  """The example options of a benchmark run of task ``name``: one eval and checkpoint at the end."""
  options = ["--steps", str(steps), "--batch-size", str(batch_size),
             "--eval-every", str(steps), "--checkpoint-every", str(steps),
             "--log-every", str(min(10, steps)),
             # quick: few block switches, so that few BAdam block steps are compiled
             "--switch-every", str(max(steps // 2, 1) if quick else 20)]
  if quick:
    options += QUICK_MODEL + (QUICK_LLAMA if name.startswith("llama") else [])
  if name.startswith("llama"):
    options += ["--gen-tokens", "0"]
  if name == "llama-pretrained":
    options += ["--pretrain-steps", str(PRETRAIN_STEPS["quick" if quick else "full"])]
  return options


def run_task(name: str, overrides: list[str], optimizers: Sequence[str], runs_dir: pathlib.Path,
             png: pathlib.Path) -> dict:
  module = TASKS[name]
  cfg = config.parse_config(module.Config, overrides + ["--out", str(runs_dir / name)],
                            module.__doc__.splitlines()[0])
  task = module.build_task(cfg)
  summaries, curves = {}, {}
  for opt in optimizers:
    out = runs_dir / name / opt
    summaries[opt] = training.train(cfg, task, opt, out)
    curves[opt] = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    print(f"{name}/{opt}: final loss {summaries[opt]['final_loss']:.4f}", flush=True)
  reporting.plot_curves(curves, png, title=f"{name}: {cfg.steps} steps, batch {cfg.batch_size}")
  return {"task": name, "config_overrides": overrides, "steps": cfg.steps,
          "batch_size": cfg.batch_size, "rank": cfg.rank, "plot": png.name,
          "summaries": summaries, "targets": _targets(summaries)}


def task_table(result: dict) -> str:
  has_acc = any("eval_accuracy" in s for s in result["summaries"].values())
  headers = ["optimizer", "final train loss", "eval loss"] + (
      ["eval accuracy"] if has_acc else []) + ["optimizer state", "median step", "wall"]
  rows = []
  for opt, s in result["summaries"].items():
    rows.append([opt, f"{s['final_loss']:.4f}", f"{s.get('eval_loss', float('nan')):.4f}"]
                + ([f"{s.get('eval_accuracy', float('nan')):.3f}"] if has_acc else [])
                + [bc.gb(s["opt_state_bytes"]), f"{1e3 * s['median_step_s']:.0f} ms",
                   f"{s['wall_s']:.0f} s"])
  targets = bc.markdown_table(["target", "measured", "met"],
                              [[t["target"], t["value"], "met" if t["met"] else "missed"]
                               for t in result["targets"]])
  return bc.markdown_table(headers, rows) + "\n\n" + targets


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bc.add_output_args(parser, "convergence")
  parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=tuple(TASKS))
  parser.add_argument("--optimizers", nargs="*", default=list(config.OPTIMIZERS),
                      choices=config.OPTIMIZERS)
  parser.add_argument("--steps", type=int, default=None, help="steps (default 200; --quick: 20)")
  parser.add_argument("--batch-size", type=int, default=None, help="default 16 (--quick: 8)")
  parser.add_argument("--runs-dir", type=pathlib.Path, default=None,
                      help="where the examples' run directories go (default: a temporary one)")
  parser.add_argument("--task-args", default="",
                      help="extra example options for every task, e.g. '--num-layers 1'")
  args = parser.parse_args(argv)
  steps = args.steps or (20 if args.quick else 200)
  batch_size = args.batch_size or (8 if args.quick else 16)
  env = bc.environment()
  start = time.perf_counter()
  runs_dir = args.runs_dir or pathlib.Path(tempfile.mkdtemp(prefix="convergence_"))
  result = {"benchmark": "convergence", "quick": args.quick, "environment": env, "tasks": []}
  for name in args.tasks:
    overrides = task_options(name, steps, batch_size, args.quick) + args.task_args.split()
    png = args.out.with_name(f"{args.out.stem}_{name}.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    result["tasks"].append(run_task(name, overrides, args.optimizers, runs_dir, png))
    bc.write_json(args.out, result | {"complete": False})
  result["wall_s"] = time.perf_counter() - start
  result["complete"] = True
  parts = [bc.environment_header(env)]
  for t in result["tasks"]:
    parts.append(f"{t['task']}: {t['steps']} steps, batch {t['batch_size']}, rank {t['rank']} "
                 f"(GaLore rank = AdaRankGrad max rank), options {' '.join(t['config_overrides'])}; "
                 f"curves: {t['plot']}")
    parts.append(task_table(t))
  result["table"] = "\n\n".join(parts)
  bc.write_json(args.out, result)
  print(result["table"])
  return result


if __name__ == "__main__":
  main()
