"""Writes ``benchmarks/RESULTS.md`` (every table) and the README's headline table from the JSON results.

Every figure comes from ``benchmarks/results/*.json`` as the scripts wrote them; nothing is typed
in by hand. Run it after any benchmark script:

    python -m benchmarks.report
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
from collections.abc import Sequence

from benchmarks import _common as bc

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS_MD = pathlib.Path(__file__).resolve().parent / "RESULTS.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"

# (JSON name, section title, command that reproduces it)
SECTIONS = (
    ("memory", "Memory of one training step", "python -m benchmarks.memory"),
    ("speed", "Step time relative to AdamW", "python -m benchmarks.speed"),
    ("adarankgrad_refresh", "AdaRankGrad's subspace refresh against GaLore's SVD",
     "python -m benchmarks.adarankgrad_refresh"),
    ("convergence_sweep", "Learning-rate sweep of the convergence benchmark (validation split)",
     "python -m benchmarks.convergence --sweep"),
    ("convergence", "Convergence on the examples' tasks", "python -m benchmarks.convergence"),
    ("badam_ablation", "BAdam's gap, ablated", "python -m benchmarks.badam_ablation"),
    ("badam_ablation_long", "BAdam's gap, ablated: longer runs",
     "python -m benchmarks.badam_ablation --out benchmarks/results/badam_ablation_long.json"),
    ("adarankgrad_ablation", "AdaRankGrad's defaults, ablated",
     "python -m benchmarks.adarankgrad_ablation"),
)
# The README's headline table: one column per optimizer; for each row, the variant of an optimizer
# it shows when that is not the plain one (the entry point that saves the most for that row).
HEADLINE_COLUMNS = ("adamw", "badam", "adarankgrad", "galore", "lora")
HEADLINE_MEMORY_SHAPE = "llama2-7b"  # the BAdam paper's model
HEADLINE_MEMORY = {"badam": "badam_block", "adarankgrad": "adarankgrad_layerwise_bf16"}
HEADLINE_SPEED = {"badam": "badam_block"}
HEADLINE_VARIANTS = {"badam_block": "block step",
                     "adarankgrad_layerwise_bf16": "layer-wise step, pure bf16"}

INTRO = """\
The optimizers side by side with `optax.adamw`, `optax.contrib.galore` and LoRA (rank 8), produced by
the scripts in `benchmarks/` on this project's 2-core CPU machine (no accelerator) and assembled by
`python -m benchmarks.report`, which also writes the README's headline table; the JSON and PNGs are in
`benchmarks/results/`. Each script has a `--quick` mode (under 2 minutes, run by the tests). The
convergence benchmark's learning rates come from its own sweep on a validation split (`python -m
benchmarks.convergence --sweep`, below); `adamw_layers` is AdamW on BAdam's trainable set (embedding
frozen, as the papers' Adam). Targets that are missed are reported as measured.
"""

NOTES = """\
## Notes

- All timings are on 2 CPU cores: ratios measured interleaved in one run are the figures to read;
  absolute times say little about an accelerator. The load average at the start of each run is in
  its header.
- Memory: the mixed-precision account (bf16 weights, fp32 master copy, gradients and optimizer
  state) is exact and counts model states only; the paper's totals also hold activations (seq 728,
  batch 2). BAdam's block-step gradients are bf16 (the step differentiates the bf16 weights) where
  the paper's 0.9 GB are fp32. The XLA table compiles float32 configs (XLA on CPU widens bf16 matmul
  operands to f32, which would inflate the temporaries), batch 1, sequence 64; its badam_block row
  is block 0's step (backward through every layer, the worst case).
- AdaRankGrad's optimizer-only step time (the refresh table's step/adamw columns) times the update
  alone on one matrix: projecting costs about ``4 m n r`` flops per step where Adam costs about
  ``10 m n``, so no projected optimizer (GaLore included) can be within 1.3x of AdamW there; in a
  training step, where the forward and backward passes dominate, the ratio is the speed table's.
- Convergence: `llama-pretrained` and `roberta-pretrained` are the papers' setting: a model first
  pretrained with AdamW on the Python reference manual (causal language modelling on the
  paragraphs that are not responses for Llama, masked language modelling on the paragraphs that
  are not held out for RoBERTa; cached once per pretraining configuration), then fine-tuned by
  every optimizer with BAdam's embedding (and Llama's LM head) frozen and RoBERTa's new task head
  always active. `adamw` trains every parameter, `adamw_layers` BAdam's trainable set (the
  papers' Adam). Each optimizer runs at the peak learning rate its sweep chose on a validation
  split carved out of the training split (the held-out split is never used to choose); BAdam's
  `switch_every` gives at least two block-epochs (in each task's header). One pretrained model per
  task is fine-tuned with every seed (a seed fixes the data order, BAdam's block order and LoRA's
  adapters; all optimizers of a seed share it and run back to back). Targets are checked on the
  per-seed differences: "beyond the spread" means that the whole band mean ± one standard
  deviation of the differences is on the verdict's side; BAdam's targets are not assessed where
  AdamW does not reach the majority share + 0.15. The majority-class row is the constant
  prediction of the training split's class frequencies.
- BAdam's gap on `roberta-pretrained`, read from the ablation above: its encoder was pretrained
  briefly (800 AdamW steps), so fine-tuning still has to move the embedding, which BAdam freezes
  by default (the papers' choice for a strongly pretrained model) and AdamW trains. With the
  embedding always active too (`--always-active embeddings`: BAdam then trains AdamW's parameter
  set, one layer at a time, with the embedding's Adam state added to one layer's), BAdam's
  held-out loss is below AdamW's. On its own trainable set the comparison is `adamw_layers`,
  against which BAdam still trails at 200 steps: each layer gets a quarter of the steps, and the
  rows with more block-epochs, a larger rate or 4x the steps narrow it; the task head trained
  always (not as a block) matters, whether its moments are reset at a switch does not. The
  longer runs are one seed: AdamW overfits this small task at 4x the steps, BAdam does not yet.
- Measured time: the cumulative time of the training steps (the first, compiling step and the
  evaluations left out; BAdam's block step compiles once per block inside the run and those
  compilations are counted). It was measured on a shared 2-core machine whose load changed during
  the run, so the time columns are rough; the step columns are exact.
- AdaRankGrad's defaults project only the matrices inside the model's layers (embeddings and
  heads get plain Adam, as in the papers) and floor the adaptive rank at half the maximum rank.
  The previous defaults projected every matrix with no floor, and on the RoBERTa task from scratch
  training stalled at the majority class whatever the rank (the ablation's "previous defaults" and
  "every matrix" rows): a randomly initialised embedding's gradient touches only the batch's tokens
  and is not low-rank. Projecting only the layers without a floor learned on some seeds only (its
  mean rank stays below 2). GaLore in the examples projects the same matrices (`--projection
  layers`, the default; `--projection all` for every matrix).
"""


def _load(name: str, results: pathlib.Path) -> dict | None:
  path = results / f"{name}.json"
  return json.loads(path.read_text()) if path.is_file() else None


def _wall(result: dict) -> str:
  wall = result.get("wall_s")
  return f" (wall time {wall / 60:.1f} min)" if wall else ""


def _reproduce(command: str, name: str, default: str = "") -> tuple[str, bool]:
  """The recorded command line without what only says where this machine kept its files:
  ``--runs-dir``, ``--reuse`` (earlier results of the same command, e.g. tasks run in separate
  processes and assembled) and an ``--out`` elsewhere than the section's own file (the one the
  section's ``default`` command names, else the script's default). Also whether ``--reuse`` was
  there."""
  default_tokens = shlex.split(default)
  own_out = (default_tokens[default_tokens.index("--out") + 1] if "--out" in default_tokens[:-1]
             else None)
  tokens, out, reused, i = shlex.split(command), [], False, 0
  while i < len(tokens):
    t = tokens[i]
    if t == "--reuse":
      reused, i = True, i + 1
      while i < len(tokens) and not tokens[i].startswith("--"):
        i += 1
      continue
    if t == "--out" and i + 1 < len(tokens) and pathlib.Path(tokens[i + 1]).name == f"{name}.json":
      out += ["--out", own_out] if own_out else []
      i += 2
      continue
    if t == "--runs-dir":
      i += 2
      continue
    out.append(t)
    i += 1
  return " ".join(map(shlex.quote, out)), reused


def results_markdown(results: pathlib.Path = bc.RESULTS) -> str:
  parts = ["# Benchmark results", "", INTRO]
  for name, title, command in SECTIONS:
    result = _load(name, results)
    if result is None:
      continue
    # A result that records its command line (e.g. the convergence benchmark) is reproduced by it.
    command, reused = _reproduce(result.get("command", command), name, command)
    stopped = ("" if result.get("complete", True) else
               " (incomplete: the run was stopped before its end; the rows are those it finished)")
    table = result.get("table")
    if table is None and name == "convergence_sweep":  # a sweep stopped before its first table
      from benchmarks import convergence as convergence_lib

      table = "\n\n".join([bc.environment_header(result["environment"])] + [
          convergence_lib.sweep_header(t) + "\n\n" + convergence_lib.sweep_table(t)
          for t in result["tasks"] + result.get("partial", [])])
    wall = (" (assembled from runs of separate processes with `--reuse`)" if reused
            else _wall(result))
    parts += [f"## {title}", "", f"Reproduce: `{command}`{stopped}{wall}", "", table]
    if result.get("note"):
      parts += ["", result["note"]]
    if name == "convergence":
      parts += [""] + [f"![{t['task']}](results/{t['plot']})" for t in result["tasks"]]
    parts.append("")
  parts.append(NOTES)
  return "\n".join(parts)


def _mean_std(s: dict, spec: str) -> str:
  return "n/a" if s.get("mean") is None else f"{s['mean']:{spec}} ± {s['std']:{spec}}"


def _variant(name: str) -> str:
  note = HEADLINE_VARIANTS.get(name)
  return f" ({note})" if note else ""


def headline_table(results: pathlib.Path = bc.RESULTS) -> str | None:
  """The README's headline: a few rows (memory, step time, held-out loss) per optimizer.

  Every cell is read from the JSON results; a result that is missing leaves its row out, one that
  lacks an optimizer leaves its cell blank. ``None`` when no result has a headline row.
  """
  rows, sources = [], []
  memory = _load("memory", results) or {"account": []}
  account = {r["optimizer"]: r for r in memory["account"] if r["shape"] == HEADLINE_MEMORY_SHAPE}
  if account:
    cells = []
    for column in HEADLINE_COLUMNS:
      name = HEADLINE_MEMORY.get(column, column)
      cells.append(bc.gb(account[name]["total_bytes"]) + _variant(name) if name in account else "")
    rows.append([f"memory, {HEADLINE_MEMORY_SHAPE}: weights + gradients + optimizer state", *cells])
  speed = _load("speed", results)
  if speed and speed.get("rows"):
    by_name = {r["optimizer"]: r for r in speed["rows"]}
    cells = []
    for column in HEADLINE_COLUMNS:
      name = HEADLINE_SPEED.get(column, column)
      cells.append(f"{by_name[name]['ratio_vs_adamw']:.2f}x{_variant(name)}" if name in by_name else "")
    rows.append([f"step time / AdamW's ({speed.get('shape', '')} Llama, one step)", *cells])
    sources.append(("speed", speed))
  convergence = _load("convergence", results)
  if convergence:
    for task in convergence.get("tasks", []):
      agg = task["aggregate"]
      seeds = len(task.get("seeds", []))
      for key, label, spec in (("eval_loss", "held-out loss", ".4f"),
                               ("eval_accuracy", "held-out accuracy", ".3f")):
        if not any(a.get(key, {}).get("n") for a in agg.values()):
          continue
        rows.append([f"{task['task']}: {label} (mean ± std, {seeds} seeds)",
                     *[_mean_std(agg[c][key], spec) if c in agg else ""
                       for c in HEADLINE_COLUMNS]])
    if convergence.get("tasks"):
      sources.append(("convergence", convergence))
  if not rows:
    return None
  table = bc.markdown_table(["", *HEADLINE_COLUMNS], rows)
  notes = []
  if account:
    notes.append(f"Memory: the exact account of {HEADLINE_MEMORY_SHAPE}'s model states (bf16 weights, "
                 "fp32 master copy, gradients and optimizer state; activations not counted).")
  if sources:
    envs = [result["environment"] for _, result in sources]
    cpus = "/".join(sorted({str(e["cpu_count"]) for e in envs}))
    backends = "/".join(sorted({e["backend"] for e in envs}))
    dates = ", ".join(f"{name} {result['environment']['date'][:10]}" for name, result in sources)
    notes.append(f"Times and held-out figures: measured on {cpus} CPU cores, backend {backends} "
                 f"({dates}).")
  notes.append("Options, machines and commands: benchmarks/RESULTS.md.")
  return f"{table}\n\n<sub>{' '.join(notes)}</sub>"


def readme_section(results: pathlib.Path = bc.RESULTS) -> str:
  """The README's generated block: the headline table and a link to the full results."""
  parts = [START, ""]
  table = headline_table(results)
  if table:
    parts += [table, ""]
  parts += ["Every table, the curves and the notes: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).",
            "", END]
  return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--readme", type=pathlib.Path, default=README)
  parser.add_argument("--results-md", type=pathlib.Path, default=RESULTS_MD)
  parser.add_argument("--results", type=pathlib.Path, default=bc.RESULTS,
                      help="folder of the benchmark JSON files")
  args = parser.parse_args(argv)
  args.results_md.write_text(results_markdown(args.results))
  readme = args.readme.read_text()
  if START not in readme or END not in readme:
    raise SystemExit(f"{args.readme} has no {START} ... {END} section to fill")
  head, rest = readme.split(START, 1)
  tail = rest.split(END, 1)[1]
  args.readme.write_text(head + readme_section(args.results) + tail)
  print(f"wrote {args.results_md} and the benchmark section of {args.readme}")


if __name__ == "__main__":
  main()
