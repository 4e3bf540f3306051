"""The benchmark scripts end to end, in their smallest settings: JSON content and tables."""

import json
import math
import shlex

import pytest

from benchmarks import ablation, adarankgrad_ablation, badam_ablation, convergence, memory, report, speed

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
               "--xla-shapes", "micro", "--accum-shapes", "micro", "--grad-accum", "4",
               "--accum-seq", "32"])
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
  assert set(xla) == set(memory.VARIANTS) | set(memory.LAYERWISE_XLA) | set(memory.ACCUMULATED)
  assert not any("XLA micro" in s for s in result["skipped"])
  for r in xla.values():
    assert r["argument_bytes"] > 0 and r["peak_bytes"] > 0 and r["compile_s"] > 0
  assert xla["badam_block"]["opt_state_bytes"] < xla["adamw"]["opt_state_bytes"]
  assert xla["badam_block"]["peak_bytes"] < xla["adamw"]["peak_bytes"]
  # (The layer-wise step's temporaries are tested on a model its stack dominates in
  # tests/test_layerwise.py; in micro the embedding and head are half the parameters.)
  assert xla["adarankgrad_layerwise"]["alias_bytes"] == xla["adarankgrad"]["alias_bytes"]
  assert any("XLA compile of" in s for s in result["skipped"])  # nothing left out silently
  # The block step's activation memory (quick: micro, batch 2 x 32): the scanned step of every
  # block needs at most the list form's bottom block, and less than the drop-in step.
  act = {(r["layers"].split()[0], r["optimizer"], r["block"]): r["temp_bytes"]
         for r in result["activations"]}
  scanned_blocks = [v for (layers, opt, _), v in act.items() if layers == "stacked" and opt == "badam_block"]
  assert len(scanned_blocks) == 2
  assert max(scanned_blocks) <= act[("list", "badam_block", 0)]
  assert max(scanned_blocks) < act[("stacked", "badam_dropin", 0)]
  # Gradient accumulation: BAdam's accumulator is one layer's (float32), at most 1/L of MultiSteps'
  # full-size one; the accumulating block step holds less than the full-gradient AdamW micro-step.
  accum = {r["optimizer"]: r for r in result["accumulation"]}
  own = accum["badam_block_accum"]
  assert own["accumulator_bytes"] == own["one_layer_f32_bytes"]
  assert own["accumulator_over_multisteps"] <= 1 / own["layers"]
  assert accum["multisteps_adamw"]["accumulator_over_multisteps"] == 1
  assert xla["badam_block_accum"]["opt_state_bytes"] > xla["badam_block"]["opt_state_bytes"]
  assert xla["badam_block_accum"]["peak_bytes"] < xla["adamw_multisteps"]["peak_bytes"]
  # AdaRankGrad layer-wise with accumulate=4: XLA's arguments are the model states (updated in
  # place), the accumulator one layer's float32 gradient, the carries 4 micro-batches' layer inputs.
  lw = accum["adarankgrad_layerwise_accum"]
  assert lw["model_states_bytes"] == lw["tree_states_bytes"] == lw["xla_alias_bytes"]
  assert lw["accumulator_bytes"] == lw["one_layer_f32_bytes"]
  assert lw["carries_bytes"] == 4 * 2 * 32 * 64 * 2  # N x L x 1 x S x d, bf16
  assert "adarankgrad_layerwise_accum" in result["table"]
  assert "Gradient accumulation" in result["table"]


def test_speed(tmp_path):
  out = tmp_path / "speed.json"
  speed.main(["--quick", "--out", str(out), "--repeats", "2", "--no-accumulation",
              "--optimizers", "adamw", "badam_dropin", "badam_block", "adarankgrad"])
  result = _read(out)
  rows = {r["optimizer"]: r for r in result["rows"]}
  assert set(rows) == {"adamw", "badam_dropin", "badam_block", "adarankgrad"}
  assert rows["adamw"]["ratio_vs_adamw"] == 1.0
  assert all(r["step_s"] > 0 for r in rows.values())
  assert rows["badam_block"]["target"].startswith("<= 0.7")
  refresh = result["refresh"]
  assert refresh["refresh_s"]["adarankgrad"] > 0 and refresh["speedup_vs_galore"] > 0
  scanned = result["scanned"]  # the scanned model: one compiled block step for both layer blocks
  assert sorted(scanned["block_step_s"]) == ["0", "1"]
  assert scanned["traces_over_two_block_epochs"] == 1
  assert scanned["max_rel_diff_vs_dropin"] < 1e-4  # Adam eps 1e-3: float32 rounding, not a step
  assert "scanned" in result["table"].lower()
  layerwise = {r["optimizer"]: r for r in result["layerwise"]["rows"]}
  assert set(layerwise) == {"adamw", "adarankgrad"} and "Layer-wise step" in result["table"]
  assert all(r["ratio"] > 0 and r["target"].startswith("<= 1.1") for r in layerwise.values())


def test_speed_accumulation_section(tmp_path):
  """--only-accumulation measures the accumulated steps per micro-batch and adds their section to
  an earlier result, after any other section; a second run replaces it."""
  out = tmp_path / "speed.json"
  env = speed.bc.environment()
  out.write_text(json.dumps({"complete": True, "environment": env, "table": "earlier table"}))
  for _ in range(2):
    speed.main(["--quick", "--out", str(out), "--repeats", "1", "--only-accumulation"])
  result = json.loads(out.read_text())
  acc = result["accumulation"]
  assert acc["grad_accum"] == 2 and acc["micro_batches_per_timed_call"] == 2 * 2  # 2 blocks
  assert all(t > 0 for t in acc["micro_step_s"].values()) and acc["ratio"] > 0
  assert acc["target"].startswith("<= 1.05")
  assert result["table"].startswith("earlier table")
  assert result["table"].count("Gradient accumulation") == 1


def test_convergence(tmp_path, monkeypatch):
  """Two seeds of the pretrained RoBERTa task: per-seed runs at the rates of a sweep JSON, mean ±
  std, majority baseline, paired targets with a verdict on the spread, BAdam's block-epochs, time
  curves, time to AdamW's final held-out loss, the plot; one pretraining, cached."""
  monkeypatch.setenv("OPTAX_MEMOPT_PRETRAIN_CACHE", str(tmp_path / "pretrained"))
  sweep = tmp_path / "sweep.json"
  sweep.write_text(json.dumps({"tasks": [{"task": "roberta-pretrained",
                                          "chosen": {"adamw": 2e-3, "badam": 5e-3}}]}))
  out = tmp_path / "convergence.json"
  opts = ["adamw", "adamw_layers", "badam", "adarankgrad"]
  argv = ["--quick", "--out", str(out), "--steps", "4", "--eval-every", "2", "--tasks",
          "roberta-pretrained", "--seeds", "0", "1", "--optimizers", *opts,
          "--learning-rates", str(sweep), "--runs-dir", str(tmp_path / "runs")]
  convergence.main(argv)
  result = _read(out)
  assert result["command"] == "python -m benchmarks.convergence " + " ".join(argv)
  (task,) = result["tasks"]
  assert task["task"] == "roberta-pretrained" and task["steps"] == 4 and task["seeds"] == [0, 1]
  assert "--pretrain-steps" in task["config_overrides"]
  # One pretrained model (--model-seed 0) fine-tuned with both seeds.
  assert len(list((tmp_path / "pretrained").glob("roberta-mlm-*/weights.npz"))) == 1
  assert task["model_seed"] == 0
  lrs = task["learning_rates"]
  assert lrs["adamw"] == {"lr": 2e-3, "source": "sweep"} and lrs["badam"]["lr"] == 5e-3
  assert lrs["adarankgrad"]["source"] == "default"
  # 4 steps are too few for 2 block-epochs: switch every step, and say how many it was.
  assert task["switch_every"] == 1 and task["blocks"] >= 2
  assert task["switch_every"] * task["blocks"] * task["block_epochs"] == pytest.approx(4)
  runs, agg = task["runs"], task["aggregate"]
  assert set(runs) == set(agg) == set(opts)
  for opt, per_seed in runs.items():
    assert [r["seed"] for r in per_seed] == [0, 1]
    losses = [r["summary"]["eval_loss"] for r in per_seed]
    assert agg[opt]["eval_loss"]["n"] == 2
    assert math.isclose(agg[opt]["eval_loss"]["mean"], sum(losses) / 2, rel_tol=1e-9)
    assert math.isclose(agg[opt]["eval_loss"]["std"], abs(losses[0] - losses[1]) / math.sqrt(2),
                        rel_tol=1e-6)
    for r in per_seed:
      curve = r["curve"]
      assert curve["eval_steps"] == [2, 4] and curve["steps"] == [1, 2, 3, 4]
      assert curve["time"][0] == 0 and curve["time"] == sorted(curve["time"])
      assert curve["train_time"] == curve["time"][-1] > 0
  # AdamW on BAdam's trainable set: the same parameters, no Adam state for the frozen embedding.
  assert (runs["adamw_layers"][0]["summary"]["trainable_params"]
          == runs["adamw"][0]["summary"]["trainable_params"])
  assert agg["adamw_layers"]["opt_state_bytes"] < agg["adamw"]["opt_state_bytes"]
  majority = task["majority"]
  assert majority["eval_accuracy"]["mean"] == pytest.approx(task["majority_accuracy"])
  assert 0 < majority["eval_loss"]["mean"] < 2
  # AdamW reaches its own final held-out loss at its last evaluation at the latest.
  assert agg["adamw"]["reach_adamw"]["reached"] == 2
  assert agg["badam"]["opt_state_bytes"] < agg["adamw"]["opt_state_bytes"]
  verdicts = {t["target"]: t for t in task["targets"]}
  learns = next(t for k, t in verdicts.items() if k.startswith("adamw learns"))
  for k, t in verdicts.items():
    assert len(t["diffs"]) == 2
    if k.startswith("badam"):  # 4 steps: adamw is at the majority class, nothing is declared met
      assert t["assessed"] == learns["met"]
      if not learns["met"]:
        assert not t["met"] and t["verdict"].startswith("not assessed")
  assert any("within 5% of adamw_layers" in k for k in verdicts)
  assert any("1.02x galore" in k for k in verdicts) is False  # no galore in this run
  assert "± " in result["table"] and "time to adamw's final held-out loss" in result["table"]
  assert "majority class" in result["table"] and "block-epochs" in result["table"]
  assert all(r["curve"]["steady_time"][0] == 0 for rs in runs.values() for r in rs)
  assert (tmp_path / "convergence_roberta-pretrained.png").stat().st_size > 0
  # --reuse: the same cells are taken from the earlier JSON, nothing is trained again.
  again = convergence.main([*argv[:2], str(tmp_path / "again.json"), *argv[3:-2], "--reuse",
                            str(out), "--runs-dir", str(tmp_path / "runs-again")])
  assert not (tmp_path / "runs-again").exists()
  (merged,) = again["tasks"]
  assert all(r["reused"] for rs in merged["runs"].values() for r in rs)
  assert merged["aggregate"] == agg and merged["targets"] == task["targets"]


def test_convergence_sweep(tmp_path, monkeypatch):
  """The learning-rate sweep: every optimizer at each rate on a validation split carved out of the
  training split (the held-out split unused), the rate of lowest validation loss chosen."""
  monkeypatch.setenv("OPTAX_MEMOPT_PRETRAIN_CACHE", str(tmp_path / "pretrained"))
  out = tmp_path / "sweep.json"
  result = convergence.main(["--quick", "--sweep", "--out", str(out), "--steps", "3",
                             "--tasks", "roberta-pretrained", "--optimizers", "adamw", "badam",
                             "--runs-dir", str(tmp_path / "runs")])
  assert json.loads(out.read_text())["complete"] and result["benchmark"] == "convergence_sweep"
  (task,) = result["tasks"]
  assert task["seed"] == 0 and task["validation_examples"] > 0
  rows = task["rows"]
  assert {(r["optimizer"], r["learning_rate"]) for r in rows} == {
      ("adamw", 1e-3), ("adamw", 3e-3), ("badam", 3e-3), ("badam", 9e-3)}
  for opt in ("adamw", "badam"):
    best = min((r for r in rows if r["optimizer"] == opt), key=lambda r: r["validation_loss"])
    assert task["chosen"][opt] == best["learning_rate"]
  assert "validation loss" in result["table"] and "**chosen**" in result["table"]
  lrs = convergence.learning_rates(out, "roberta-pretrained", ["adamw", "lora"])
  assert lrs["adamw"] == {"lr": task["chosen"]["adamw"], "source": "sweep"}
  assert lrs["lora"]["source"] == "default"


def test_validation_split_and_majority_baseline():
  """The sweep's validation rows come from the training split only (disjoint, together all of
  it); the majority baseline is the accuracy and loss of a constant class-frequency guess."""
  import numpy as np

  from examples import training

  train = {"labels": np.array([0, 0, 0, 1, 1, 2, 0, 1, 0, 0]), "weight": np.ones(10),
           "row": np.arange(10)}
  held = {"labels": np.array([0, 1, 1, 1]), "weight": np.ones(4)}
  task = training.Task("t", lambda: None, lambda m, b: None, train, held)
  val = convergence.validation_task(task, seed=0)
  rows_t, rows_v = set(val.train_data["row"]), set(val.eval_data["row"])
  assert len(rows_v) == 2 and not rows_t & rows_v and rows_t | rows_v == set(range(10))
  base = convergence.majority_baseline(task)
  assert base["eval_accuracy"] == 0.75
  p = np.array([7, 4, 2]) / 13  # add-one training frequencies of classes 0, 1, 2
  assert base["eval_loss"] == pytest.approx(-(np.log(p[0]) + 3 * np.log(p[1])) / 4)
  opts = convergence.task_options("roberta-pretrained", 200, 16, False)
  assert opts[opts.index("--switch-every") + 1] == "25"  # 200 steps, 4 layer blocks: 2 epochs
  opts = convergence.task_options("llama-pretrained", 200, 16, False, extra=["--num-layers", "2"])
  assert opts[opts.index("--switch-every") + 1] == "50"


def test_convergence_verdicts_and_timeline():
  """The spread verdicts on paired differences, and measured time rebuilt from metrics.jsonl."""
  verdict = lambda diffs: convergence._verdict(diffs, 0.0)[0]  # noqa: E731
  assert verdict([-0.3, -0.2, -0.25]) == "met beyond the spread"
  assert verdict([-0.3, 0.2, -0.05]) == "met within the spread"
  assert verdict([0.3, -0.2, 0.05]) == "missed within the spread"
  assert verdict([0.3, 0.2, 0.25]) == "missed beyond the spread"
  records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
             {"step": 3, "loss": 2.0, "step_time": 0.5},  # steps 2 and 3 (step 1 compiles)
             {"step": 3, "eval_loss": 2.2},
             {"step": 4, "loss": 1.5}, {"step": 5, "loss": 1.0, "step_time": 2.0},
             {"step": 5, "eval_loss": 1.9}]
  curve = convergence.timeline(records)
  assert curve["time"] == [0.0, 0.5, 1.0, 3.0, 5.0] and curve["train_time"] == 5.0
  assert curve["eval_time"] == [1.0, 5.0]
  curve = convergence.steady_time(curve, 0.5)
  assert curve["steady_time"] == [0.0, 0.5, 1.0, 1.5, 2.0] and curve["eval_steady_time"] == [1, 2]
  assert convergence.time_to_reach(curve, 2.0) == {"step": 5, "time_s": 5.0,
                                                   "steady_time_s": 2.0}
  assert convergence.time_to_reach(curve, 1.0) is None


def test_adarankgrad_ablation(tmp_path):
  out = tmp_path / "adarankgrad_ablation.json"
  variants = ["galore (rank = max rank), layers",
              "previous defaults (every matrix, eta 0.9, min rank 1)",
              "layers, eta 1.0 (rank = max rank)", "layers, eta 0.9, min rank 1"]
  result = adarankgrad_ablation.main(["--quick", "--out", str(out), "--steps", "4",
                                      "--tasks", "roberta", "--variants", *variants])
  assert json.loads(out.read_text())["complete"]
  (task,) = result["tasks"]
  rows = {r["variant"]: r for r in task["rows"]}
  assert set(rows) == set(variants)
  rank = {v: rows[v]["seeds"][0]["mean_rank"] for v in variants}
  # eta = 1 keeps every direction the sketch finds (up to max rank and each matrix's own size).
  assert 1 <= rank[variants[3]] <= rank[variants[2]] <= task["rank"]
  assert 1 <= rank[variants[1]] <= task["rank"]
  assert math.isnan(rank[variants[0]])  # GaLore logs no rank
  assert "| layers, eta 1.0 (rank = max rank) |" in result["table"] and " ± " in result["table"]


def test_badam_ablation(tmp_path, monkeypatch):
  """The BAdam study in its smallest setting: rows at the sweep's rates, each row's options in its
  runs (block count, switch_every, the optimizer state BAdam keeps), the ratio to the AdamW row."""
  monkeypatch.setenv("OPTAX_MEMOPT_PRETRAIN_CACHE", str(tmp_path / "pretrained"))
  sweep = tmp_path / "sweep.json"
  sweep.write_text(json.dumps({"tasks": [{"task": "roberta-pretrained",
                                          "chosen": {"adamw": 2e-3, "badam": 5e-3}}]}))
  out = tmp_path / "badam_ablation.json"
  variants = ["adamw", "benchmark setting", "head not always active (a block of its own)",
              "embedding always active too"]
  argv = ["--quick", "--out", str(out), "--steps", "2", "--learning-rates", str(sweep),
          "--variants", *variants]
  result = badam_ablation.main(argv)
  saved = json.loads(out.read_text())
  assert saved["complete"] and saved["command"] == ("python -m benchmarks.badam_ablation "
                                                    + shlex.join(argv))
  (task,) = result["tasks"]
  rows = {r["variant"]: r for r in task["rows"]}
  assert list(rows) == variants and task["left_out"] == []
  base, head, emb = (rows[v] for v in variants[1:])
  assert rows["adamw"]["learning_rate"] == 2e-3 and base["learning_rate"] == 5e-3
  assert base["lr_source"] == "sweep" and base["seeds"][0]["config"]["learning_rate"] == 5e-3
  # 2 layers, 2 block-epochs in 2 steps: switch every step; the head as a block adds one.
  assert base["blocks"] == 2 and head["blocks"] == 3 and base["switch_every"] == 1
  assert base["seeds"][0]["config"]["switch_every"] == 1
  assert not head["seeds"][0]["config"]["always_active_head"]
  assert emb["seeds"][0]["config"]["always_active"] == "embeddings"
  # The state holds the active block plus the always-active leaves: the head's (smaller than a
  # layer's) leaves it as a block; the embedding's joins it.
  state = {v: rows[v]["seeds"][0]["opt_state_bytes"] for v in variants}
  assert state[variants[2]] < state[variants[1]] < state[variants[3]] < state["adamw"]
  loss = {v: rows[v]["seeds"][0]["eval_loss"] for v in variants}
  assert base["ratios"] == [loss["benchmark setting"] / loss["adamw"]]
  assert rows["adamw"]["ratios"] == [] and base["reference"] == "adamw"
  table = result["table"]
  assert "| head not always active (a block of its own) | badam | 2 | 1 (0.7) |" in table
  assert f"| {base['ratios'][0]:.3f} ± 0.000 | adamw |" in table and "pretraining steps" not in table
  # --reuse: the same runs are taken from the earlier JSON, nothing is trained again.
  monkeypatch.setattr(ablation.training, "train", lambda *a, **k: pytest.fail("trained again"))
  again = badam_ablation.main(argv[:2] + [str(tmp_path / "again.json")] + argv[3:]
                              + ["--reuse", str(out)])
  assert all(s["reused"] for r in again["tasks"][0]["rows"] for s in r["seeds"])
  assert again["table"].split("\n\n", 1)[1] == table.split("\n\n", 1)[1]


def test_ablation_row_settings():
  """A variant's own steps (switch_every scaled to keep its block-epochs), block-epochs, rate
  multiple and pretraining multiple reach its options."""
  lrs = {"badam": {"lr": 1e-3, "source": "sweep"}}

  def row(variant):
    return ablation._row("roberta-pretrained", "v", variant, 200, 16, False, [], None, lrs)

  def opts(r, flag):  # the value argparse takes: the last one given
    options = r["config_overrides"]
    return options[max(i for i, o in enumerate(options) if o == flag) + 1]

  base = row(ablation.Variant("badam"))
  assert opts(base, "--switch-every") == "25" and opts(base, "--pretrain-steps") == "800"
  long = row(ablation.Variant("badam", steps_factor=4))
  assert long["steps"] == 800 and opts(long, "--steps") == "800"
  assert opts(long, "--switch-every") == "100"
  assert opts(row(ablation.Variant("badam", block_epochs=5)), "--switch-every") == "10"
  assert opts(row(ablation.Variant("badam", ("--no-always-active-head",))), "--switch-every") == "20"
  fast = row(ablation.Variant("badam", lr_factor=3.0))
  assert fast["learning_rate"] == 3e-3 and fast["lr_source"] == "sweep x 3"
  pre = row(ablation.Variant("badam", pretrain_factor=4))
  assert pre["pretrain_steps"] == 3200 and opts(pre, "--pretrain-steps") == "3200"


def test_report_renders_the_badam_ablation(tmp_path):
  env = {"date": "2026-01-01T00:00:00", "platform": "p", "processor": "x", "cpu_count": 2,
         "load_average": [0.5, 0.5, 0.5], "python": "3", "jax": "j", "optax": "o", "flax": "f",
         "backend": "cpu"}
  (tmp_path / "badam_ablation.json").write_text(json.dumps(
      {"environment": env, "complete": True, "wall_s": 120.0, "note": "What the rows change.",
       "command": "python -m benchmarks.badam_ablation --seeds 0",
       "table": "Machine: header\n\n| variant | held-out loss |"}))
  md = report.results_markdown(tmp_path)
  assert ("## BAdam's gap, ablated\n\nReproduce: `python -m benchmarks.badam_ablation --seeds 0` "
          "(wall time 2.0 min)") in md
  assert "| variant | held-out loss |\n\nWhat the rows change." in md


def test_report_builds_results_md_and_readme_section(tmp_path):
  """RESULTS.md gets every table; the README's block only the headline rows read from the JSON."""
  results = tmp_path / "results"
  results.mkdir()
  env = {"date": "2026-01-01T00:00:00", "platform": "p", "processor": "x", "cpu_count": 2,
         "load_average": [0.5, 0.5, 0.5], "python": "3", "jax": "j", "optax": "o", "flax": "f",
         "backend": "cpu"}
  (results / "speed.json").write_text(json.dumps(
      {"environment": env, "shape": "small", "wall_s": 60.0,
       "rows": [{"optimizer": "adamw", "ratio_vs_adamw": 1.0},
                {"optimizer": "badam_dropin", "ratio_vs_adamw": 1.011},
                {"optimizer": "badam_block", "ratio_vs_adamw": 0.514}],
       "table": "Machine: header\n\n| optimizer | ratio |\n|---|---|\n| badam_dropin | 1.01x |"}))
  (results / "memory.json").write_text(json.dumps(
      {"environment": env, "table": "Machine: header\n\n| full memory table |",
       "account": [{"shape": s, "optimizer": o, "total_bytes": b} for s, o, b in (
           ("tiny", "adamw", 1e6), ("llama2-7b", "adamw", 121.3e9),
           ("llama2-7b", "badam_block", 16.3e9), ("llama2-7b", "adarankgrad", 69.2e9),
           ("llama2-7b", "adarankgrad_layerwise_bf16", 15.3e9))]}))
  # A result that records its command line is reproduced by that command (a stopped one says so).
  (results / "convergence_sweep.json").write_text(json.dumps(
      {"environment": env, "complete": False, "table": "Machine: header\n\n| optimizer |",
       "command": "python -m benchmarks.convergence --sweep --tasks roberta-pretrained"}))
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{report.START}\nold\n{report.END}\nafter\n")
  results_md = tmp_path / "RESULTS.md"
  report.main(["--readme", str(readme), "--results-md", str(results_md),
               "--results", str(results)])
  text = readme.read_text()
  assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
  block = text.split(report.START)[1].split(report.END)[0]
  # The headline: the block step's ratio and 7B memory, layer-wise AdaRankGrad's; no full table.
  (speed_row,) = [line for line in block.splitlines() if line.startswith("| step time")]
  assert "| 1.00x | 0.51x (block step) |" in speed_row and "1.01x" not in block
  (memory_row,) = [line for line in block.splitlines() if line.startswith("| memory, llama2-7b")]
  assert "| 121.30 GB | 16.30 GB (block step) | 15.30 GB (layer-wise" in memory_row
  assert "69.20 GB" not in block and "1.0 MB" not in block
  assert "full memory table" not in block and "Machine: header" not in block
  assert "speed 2026-01-01" in block and "benchmarks/RESULTS.md" in block
  md = results_md.read_text()
  assert "| badam_dropin | 1.01x |" in md and "| full memory table |" in md
  assert "Reproduce: `python -m benchmarks.speed` (wall time 1.0 min)" in md
  assert ("Reproduce: `python -m benchmarks.convergence --sweep --tasks roberta-pretrained` "
          "(incomplete" in md)
  assert "Machine: header" in md
  readme.write_text("no markers")
  with pytest.raises(SystemExit):
    report.main(["--readme", str(readme), "--results-md", str(results_md),
                 "--results", str(results)])


def test_report_headline_reads_the_convergence_aggregate(tmp_path):
  """Held-out loss per optimizer (mean ± std over the seeds), blank for an optimizer not run."""
  env = {"date": "2026-02-03T00:00:00", "cpu_count": 2, "backend": "cpu"}
  stat = lambda m, s: {"mean": m, "std": s, "n": 3}
  agg = {o: {"eval_loss": stat(loss, 0.01), "eval_accuracy": {"mean": None, "std": None, "n": 0}}
         for o, loss in (("adamw", 0.61), ("badam", 0.82), ("adarankgrad", 0.49))}
  (tmp_path / "convergence.json").write_text(json.dumps(
      {"environment": env, "tasks": [{"task": "t", "seeds": [0, 1, 2], "aggregate": agg}]}))
  table = report.headline_table(tmp_path)
  (row,) = [line for line in table.splitlines() if line.startswith("| t:")]
  assert row == ("| t: held-out loss (mean ± std, 3 seeds) | 0.6100 ± 0.0100 | 0.8200 ± 0.0100 "
                 "| 0.4900 ± 0.0100 |  |  |")
  assert "accuracy" not in table and "convergence 2026-02-03" in table
  assert report.headline_table(tmp_path / "missing") is None


def test_sweep_extends_the_grid_beyond_a_best_edge(tmp_path, monkeypatch):
  """A lowest validation loss at an end of the grid adds rates beyond it (a factor 3 each, at most
  SWEEP_EXTEND), so the chosen rate is not just the grid's edge; reused rows are not trained."""
  import numpy as np

  from examples import finetune_roberta, training

  data = {"labels": np.zeros(10, int), "weight": np.ones(10)}
  monkeypatch.setattr(finetune_roberta, "build_task", lambda cfg: training.Task(
      "t", lambda: None, lambda m, b: None, dict(data), dict(data)))
  trained = []

  def fake_train(cfg, task, opt, out):
    trained.append((opt, cfg.learning_rate))
    loss = abs(np.log(cfg.learning_rate / 1e-4)) + (0.5 if opt == "badam" else 0)
    return {"eval_loss": loss, "final_loss": loss, "median_step_s": 0.1}

  monkeypatch.setattr(training, "train", fake_train)
  options = convergence.task_options("roberta-pretrained", 20, 4, False)
  t = convergence.sweep_task("roberta-pretrained", options, ["adamw", "badam"], 0,
                             convergence.SWEEP_FACTORS, tmp_path)
  # adamw (default 1e-3): 3.33e-4, 1e-3, 3e-3, then 1.11e-4 and 3.7e-5 below (the best is 1.11e-4).
  assert sorted(r["learning_rate"] for r in t["rows"] if r["optimizer"] == "adamw") == [
      3.7e-5, 1.11e-4, 3.33e-4, 1e-3, 3e-3]
  assert t["chosen"]["adamw"] == 1.11e-4
  assert "**chosen**" in convergence.sweep_table(t)
  # Rerun with the rows of the first: nothing is trained again.
  path = tmp_path / "sweep.json"
  path.write_text(json.dumps({"tasks": [t]}))
  trained.clear()
  again = convergence.sweep_task("roberta-pretrained", options, ["adamw", "badam"], 0,
                                 convergence.SWEEP_FACTORS, tmp_path,
                                 reuse=convergence.reusable_sweep_rows([path]))
  assert trained == [] and again["chosen"] == t["chosen"]


def test_report_reproduce_line_leaves_out_this_machines_paths():
  """The RESULTS.md command drops --runs-dir, an --out that is the section's own file and --reuse
  (and says the result was assembled); any other option stays, quoted."""
  from benchmarks import report

  cmd, reused = report._reproduce(
      "python -m benchmarks.badam_ablation --variants adamw 'lr x3' --reuse /w/a.json /w/b.json "
      "--runs-dir /w/runs --out /w/badam_ablation.json --seeds 0 1", "badam_ablation")
  assert (cmd, reused) == ("python -m benchmarks.badam_ablation --variants adamw 'lr x3' --seeds 0 1",
                           True)
  own = "python -m benchmarks.badam_ablation --out benchmarks/results/badam_ablation_long.json"
  cmd, reused = report._reproduce("python -m benchmarks.badam_ablation --seeds 0 --out "
                                  "/w/badam_ablation_long.json", "badam_ablation_long", own)
  assert cmd == ("python -m benchmarks.badam_ablation --seeds 0 --out "
                 "benchmarks/results/badam_ablation_long.json") and not reused
