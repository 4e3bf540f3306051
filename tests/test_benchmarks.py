"""The benchmark scripts end to end, in their smallest settings: JSON content and tables."""

import json
import math

import pytest

from benchmarks import adarankgrad_ablation, convergence, memory, report, speed

pytestmark = pytest.mark.slow


def _read(path):
  result = json.loads(path.read_text())
  assert result["complete"]
  env = result["environment"]
  assert env["cpu_count"] >= 1 and env["jax"] and env["optax"] and env["flax"]
  assert "| optimizer |" in result["table"] and env["date"] in result["table"]
  return result


def test_memory(tmp_path):
  out = tmp_path / "memory.json"
  memory.main(["--quick", "--out", str(out), "--account-shapes", "micro",
               "--xla-shapes", "micro"])
  result = _read(out)
  account = {(r["shape"], r["optimizer"]): r for r in result["account"]}
  assert {o for _, o in account} == set(memory.VARIANTS) | set(memory.LAYERWISE_ACCOUNT)
  for r in account.values():
    assert r["total_bytes"] == (r["weights_bytes"] + r["master_bytes"] + r["grad_bytes"]
                                + r["opt_state_bytes"]) > 0
  acc = {o: r for (s, o), r in account.items() if s == "micro"}
  # Adam in mixed precision: 18 bytes per parameter (bf16 weights; fp32 master, grads, m and v).
  assert abs(acc["adamw"]["total_bytes"] - 18 * acc["adamw"]["model_params"]) < 100  # + counters
  assert acc["badam_block"]["opt_state_bytes"] < acc["adamw"]["opt_state_bytes"] / 2
  assert acc["badam_block"]["total_bytes"] < acc["badam_dropin"]["total_bytes"]
  assert acc["badam_dropin"]["total_bytes"] < acc["adamw"]["total_bytes"]
  assert acc["lora"]["trained_params"] < acc["adamw"]["trained_params"] / 5
  # Pure bf16 layer-wise AdaRankGrad: no master copy, gradients of one layer plus the outer leaves.
  lw = acc["adarankgrad_layerwise_bf16"]
  assert lw["master_bytes"] == 0 and lw["grad_bytes"] < acc["adarankgrad"]["grad_bytes"] / 2
  assert lw["grad_bytes"] == lw["one_layer_grad_bytes"] + lw["outer_grad_bytes"]
  assert lw["total_bytes"] < acc["adarankgrad"]["total_bytes"] / 2
  # The same model with its layers stacked: the same state (BAdam: one layer's AdamW state, plus
  # its fp32 master copy for bf16 weights, plus the schedule's few scalars).
  stacked = result["stacked_vs_list"]
  assert {(r["optimizer"], r["param_dtype"]) for r in stacked} == set(memory.STACK_CHECK)
  for r in stacked:
    assert abs(r["stacked_over_list"] - 1) <= 0.01, r
    if "one_layer_adamw_bytes" in r:
      assert 1 <= r["stacked_over_one_layer"] <= 1.01, r
  xla = {r["optimizer"]: r for r in result["xla"]}
  assert set(xla) == set(memory.VARIANTS) | set(memory.LAYERWISE_XLA)
  assert not any("XLA micro" in s for s in result["skipped"])
  for r in xla.values():
    assert r["argument_bytes"] > 0 and r["peak_bytes"] > 0 and r["compile_s"] > 0
  assert xla["badam_block"]["opt_state_bytes"] < xla["adamw"]["opt_state_bytes"]
  assert xla["badam_block"]["peak_bytes"] < xla["adamw"]["peak_bytes"]
  # (The layer-wise step's temporaries are tested on a model its stack dominates in
  # tests/test_layerwise.py; in micro the embedding and head are half the parameters.)
  assert xla["adarankgrad_layerwise"]["alias_bytes"] == xla["adarankgrad"]["alias_bytes"]
  assert any("XLA compile of" in s for s in result["skipped"])  # nothing left out silently


def test_speed(tmp_path):
  out = tmp_path / "speed.json"
  speed.main(["--quick", "--out", str(out), "--repeats", "2",
              "--optimizers", "adamw", "badam_dropin", "badam_block", "adarankgrad"])
  result = _read(out)
  rows = {r["optimizer"]: r for r in result["rows"]}
  assert set(rows) == {"adamw", "badam_dropin", "badam_block", "adarankgrad"}
  assert rows["adamw"]["ratio_vs_adamw"] == 1.0
  assert all(r["step_s"] > 0 for r in rows.values())
  assert rows["badam_block"]["target"].startswith("<= 0.7")
  refresh = result["refresh"]
  assert refresh["refresh_s"]["adarankgrad"] > 0 and refresh["speedup_vs_galore"] > 0
  layerwise = {r["optimizer"]: r for r in result["layerwise"]["rows"]}
  assert set(layerwise) == {"adamw", "adarankgrad"} and "Layer-wise step" in result["table"]
  assert all(r["ratio"] > 0 and r["target"].startswith("<= 1.1") for r in layerwise.values())


def test_convergence(tmp_path):
  out = tmp_path / "convergence.json"
  convergence.main(["--quick", "--out", str(out), "--steps", "6", "--tasks", "roberta",
                    "--optimizers", "adamw", "badam", "lora", "--runs-dir", str(tmp_path / "runs")])
  result = _read(out)
  (task,) = result["tasks"]
  assert task["task"] == "roberta" and task["steps"] == 6
  s = task["summaries"]
  assert set(s) == {"adamw", "badam", "lora"}
  for summary in s.values():
    assert summary["final_loss"] > 0 and 0 <= summary["eval_accuracy"] <= 1
  assert s["badam"]["opt_state_bytes"] < s["adamw"]["opt_state_bytes"]
  assert {t["target"] for t in task["targets"]} == {
      "badam within 5% of adamw's final loss", "badam within 5% of adamw's eval loss (held-out)",
      "badam better than lora"}
  assert (tmp_path / "convergence_roberta.png").stat().st_size > 0


def test_adarankgrad_ablation(tmp_path):
  out = tmp_path / "adarankgrad_ablation.json"
  variants = ["galore (rank = max rank)", "adarankgrad defaults (eta 0.9)",
              "eta 1.0 (rank = max rank)"]
  result = adarankgrad_ablation.main(["--quick", "--out", str(out), "--steps", "4",
                                      "--tasks", "roberta", "--variants", *variants])
  assert json.loads(out.read_text())["complete"]
  (task,) = result["tasks"]
  rows = {r["variant"]: r for r in task["rows"]}
  assert set(rows) == set(variants)
  # eta = 1 keeps every direction the sketch finds (up to max rank and each matrix's own size).
  full, default = (rows[v]["mean_rank"] for v in variants[2:0:-1])
  assert 1 <= default <= full <= task["rank"]
  assert math.isnan(rows["galore (rank = max rank)"]["mean_rank"])  # GaLore logs no rank
  assert "| eta 1.0 (rank = max rank) |" in result["table"]


def test_report_builds_results_md_and_readme_section(tmp_path):
  results = tmp_path / "results"
  results.mkdir()
  env = {"date": "2026-01-01T00:00:00", "platform": "p", "processor": "x", "cpu_count": 2,
         "load_average": [0.5, 0.5, 0.5], "python": "3", "jax": "j", "optax": "o", "flax": "f",
         "backend": "cpu"}
  (results / "speed.json").write_text(json.dumps(
      {"environment": env, "shape": "small", "wall_s": 60.0,
       "table": "Machine: header\n\n| optimizer | ratio |\n|---|---|\n| adamw | 1.00x |"}))
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{report.START}\nold\n{report.END}\nafter\n")
  results_md = tmp_path / "RESULTS.md"
  report.main(["--readme", str(readme), "--results-md", str(results_md),
               "--results", str(results)])
  text = readme.read_text()
  assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
  assert "| adamw | 1.00x |" in text and "Machine: header" not in text and env["date"] in text
  md = results_md.read_text()
  assert "Reproduce: `python -m benchmarks.speed` (wall time 1.0 min)" in md
  assert "Machine: header" in md and "memory" not in md.split("## Notes")[0].lower()
  readme.write_text("no markers")
  with pytest.raises(SystemExit):
    report.main(["--readme", str(readme), "--results-md", str(results_md),
                 "--results", str(results)])
