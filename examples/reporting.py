"""What a run reports: the metrics file and progress bar, the summary, tables and loss plots."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from examples.config import FINAL_LOSS_STEPS


class Progress:
  """The metrics of a run as it goes: ``metrics.jsonl``, the progress bar, the step times.

  Losses are buffered and fetched from the device every ``log_every`` steps (:meth:`flush`), so
  that logging does not stall the dispatch of the next steps. The first step of a run is waited
  for and kept out of the step times: it includes compilation.

  Args:
    path: the ``metrics.jsonl`` file; a resumed run keeps its records up to ``start``.
    start: the first step (0, or the resumed step).
    total: the run's number of steps (for the bar).
    desc: the bar's label.
  """

  def __init__(self, path: pathlib.Path, *, start: int, total: int, desc: str):
    from tqdm.auto import tqdm

    self.records: list[dict] = []
    if start and path.exists():
      self.records = [r for r in map(json.loads, path.read_text().splitlines())
                      if r["step"] <= start]
    self._file = path.open("w")
    for r in self.records:
      self._file.write(json.dumps(r) + "\n")
    self._bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, file=sys.stdout,
                     mininterval=1.0)
    self.step_times: list[float] = []
    self._pending: list[tuple[int, object]] = []
    self._tokens = self._timed = 0
    self._first = True
    self.start_time = self._t = time.perf_counter()

  def step(self, step: int, loss, tokens: int) -> None:
    """Records the (device) ``loss`` of ``step`` and the number of ``tokens`` it trained on."""
    self._pending.append((step, loss))
    if self._first:  # compilation: wait for it, then time from here
      import jax

      jax.block_until_ready(loss)
      self._first, self._t = False, time.perf_counter()
    else:
      self._tokens += tokens
      self._timed += 1

  def flush(self, **info) -> None:
    """Writes the buffered losses; ``info`` (e.g. BAdam's block) goes with the last of them."""
    if not self._pending:
      return
    import jax

    losses = jax.device_get([x for _, x in self._pending])
    dt = time.perf_counter() - self._t
    if self._timed:
      step_time = dt / self._timed
      self.step_times.append(step_time)
      info = {"tokens_per_s": round(self._tokens / dt, 1), "step_time": step_time, **info}
    last = self._pending[-1][0]
    for (s, _), value in zip(self._pending, losses, strict=True):
      self.log({"step": s, "loss": float(value), **(info if s == last else {})})
    self._bar.set_postfix({"loss": f"{float(losses[-1]):.3f}",
                           **({"tok/s": f"{info['tokens_per_s']:.0f}"} if self._timed else {}),
                           **{k: v for k, v in info.items() if k in ("block", "rank")}})
    self._bar.update(len(self._pending))
    self._pending, self._tokens, self._timed = [], 0, 0
    self.restart_clock()

  def restart_clock(self) -> None:
    """Leaves the time since the last flush (e.g. an evaluation) out of the step times."""
    self._t = time.perf_counter()

  def log(self, record: dict) -> None:
    self.records.append(record)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._bar.close()
    self._file.close()


def summarize(records: Sequence[dict], **fields) -> dict:
  """The summary of a run: first and final train loss (mean of the last ``FINAL_LOSS_STEPS``),
  the last evaluation, median step time, and ``fields``. Values that do not exist (no timed
  step, a NaN loss) are None, so that ``summary.json`` stays valid JSON."""
  losses = [r["loss"] for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  step_times = fields.pop("step_times", [])
  summary = {
      "first_loss": losses[0] if losses else None,
      "final_loss": float(np.mean(losses[-FINAL_LOSS_STEPS:])) if losses else None,
      **({k: v for k, v in evals[-1].items() if k != "step"} if evals else {}),
      "median_step_s": float(np.median(step_times)) if step_times else None,
      **fields,
  }
  return {k: None if isinstance(v, float) and not math.isfinite(v) else v
          for k, v in summary.items()}


def _number(value, spec: str, scale: float = 1.0, unit: str = "") -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return f"{scale * value:{spec}}{unit}"


def markdown_table(summaries: Sequence[dict]) -> str:
  """One row per run: steps, losses, (accuracy), optimizer state bytes and median step time."""
  has_acc = any("eval_accuracy" in s for s in summaries)
  head = ["optimizer", "steps", f"train loss (mean of last {FINAL_LOSS_STEPS} steps)",
          "eval loss"] + (["eval accuracy"] if has_acc else []) + ["optimizer state", "median step"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summaries:
    row = [s["optimizer"], str(s["steps"]), _number(s["final_loss"], ".3f"),
           _number(s.get("eval_loss"), ".3f")]
    if has_acc:
      row.append(_number(s.get("eval_accuracy"), ".3f"))
    row += [human_bytes(s["opt_state_bytes"]), _number(s["median_step_s"], ".0f", 1000, " ms")]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def human_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return ""


def plot_curves(runs: dict[str, list[dict]], path: pathlib.Path, title: str = "") -> None:
  """Training loss (and eval loss, dashed) against step, one colour per run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i, (name, records) in enumerate(runs.items()):
    color = f"C{i}"
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    ax.plot(steps, losses, color=color, alpha=0.35, lw=0.8)
    if len(losses) >= 10:  # a running mean makes the trend readable
      w = max(len(losses) // 30, 5)
      smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
      ax.plot(steps[w - 1:], smooth, color=color, label=f"{name} (train)")
    else:
      ax.lines[-1].set_label(f"{name} (train)")
    ev = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if ev:
      ax.plot(*zip(*ev, strict=True), "o--", color=color, label=f"{name} (eval)")
  ax.set(xlabel="step", ylabel="loss", title=title)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
