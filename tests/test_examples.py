"""End-to-end runs of the fine-tuning examples with tiny configs (offline, a few steps each)."""

import json
import pathlib
import re

import pytest

from examples import finetune_llama, finetune_roberta

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parent.parent


LLAMA = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--hidden-size", "32",
         "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1",
         "--intermediate-size", "64", "--vocab-size", "300", "--max-examples", "40",
         "--eval-every", "6", "--checkpoint-every", "3", "--log-every", "2", "--switch-every", "3",
         "--gen-tokens", "4"]
ROBERTA = ["--steps", "4", "--batch-size", "4", "--seq-len", "24", "--hidden-size", "32",
           "--num-layers", "2", "--num-heads", "2", "--intermediate-size", "64",
           "--vocab-size", "300", "--max-examples", "80", "--eval-every", "4",
           "--checkpoint-every", "2",
           "--log-every", "2", "--switch-every", "4"]


def _losses(out: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_llama_badam_runs_and_resumes_exactly(tmp_path, capsys):
  full, cut = tmp_path / "full", tmp_path / "cut"
  [summary] = finetune_llama.main(LLAMA + ["--out", str(full)])
  assert summary["optimizer"] == "badam" and summary["steps"] == 6
  assert (full / "loss.png").is_file() and (full / "tokenizer.json").is_file()
  assert "[badam, held-out]" in capsys.readouterr().out  # the generation is printed

  finetune_llama.main(LLAMA + ["--out", str(cut), "--stop-at", "3", "--gen-tokens", "0"])
  assert sorted(_losses(cut)) == [1, 2, 3]
  finetune_llama.main(LLAMA + ["--out", str(cut), "--resume", "--gen-tokens", "0"])
  assert "resumed badam from step 3" in capsys.readouterr().out
  assert _losses(cut) == _losses(full)  # bit-identical, step by step


def test_llama_sharded_on_a_mesh_matches_one_device(tmp_path, capsys):
  """--mesh data=2,model=4 on the 8 simulated CPU devices (conftest.py): same losses as one device;
  a sharded run says so and resumes from its checkpoint."""
  args = LLAMA + ["--gen-tokens", "0", "--stop-at", "4"]
  finetune_llama.main(args + ["--out", str(tmp_path / "one")])
  assert "sharded over" not in capsys.readouterr().out
  finetune_llama.main(args + ["--out", str(tmp_path / "mesh"), "--mesh", "data=2,model=4"])
  assert "sharded over a data=2 x model=4 mesh of 8 devices" in capsys.readouterr().out
  one, mesh = _losses(tmp_path / "one"), _losses(tmp_path / "mesh")
  assert sorted(mesh) == [1, 2, 3, 4]
  for step, loss in one.items():
    assert abs(mesh[step] - loss) <= 1e-4 * abs(loss), (step, mesh[step], loss)
  # Resuming the sharded run restores sharded arrays and continues.
  finetune_llama.main(args[:-2] + ["--out", str(tmp_path / "mesh"), "--mesh", "data=2,model=4",
                                   "--resume"])
  assert sorted(_losses(tmp_path / "mesh")) == list(range(1, 7))


def test_llama_scan_layers_on_a_mesh_trains_one_layer_and_resumes(tmp_path, capsys):
  """--scan-layers with --mesh: BAdam's state is one layer's, as with the list of layers (the
  issue-11 bug: a stacked model's state was AdamW's), and the sharded scanned run resumes."""
  args = LLAMA + ["--gen-tokens", "0", "--stop-at", "3"]
  [listed] = finetune_llama.main(args + ["--out", str(tmp_path / "list")])
  [scanned] = finetune_llama.main(args + ["--out", str(tmp_path / "scan"), "--scan-layers",
                                          "--mesh", "data=2,model=4"])
  assert scanned["opt_state_bytes"] == listed["opt_state_bytes"]
  finetune_llama.main(args[:-2] + ["--out", str(tmp_path / "scan"), "--scan-layers",
                                   "--mesh", "data=2,model=4", "--resume"])
  assert "resumed badam from step 3" in capsys.readouterr().out
  assert sorted(_losses(tmp_path / "scan")) == list(range(1, 7))


def test_llama_layerwise_matches_the_ordinary_step(tmp_path):
  """--layerwise (the optimizer inside the backward pass) trains as the ordinary step does."""
  args = LLAMA + ["--gen-tokens", "0", "--stop-at", "4", "--optimizer", "adarankgrad",
                  "--scan-layers", "--clip-norm", "0"]
  finetune_llama.main(args + ["--out", str(tmp_path / "ordinary")])
  [summary] = finetune_llama.main(args + ["--out", str(tmp_path / "layerwise"), "--layerwise"])
  assert summary["optimizer"] == "adarankgrad"
  ordinary, layerwise = _losses(tmp_path / "ordinary"), _losses(tmp_path / "layerwise")
  assert sorted(layerwise) == [1, 2, 3, 4]
  for step, loss in ordinary.items():
    # AdaRankGrad's per-layer randomized SVD against the stacked one: float32 rounding.
    assert abs(layerwise[step] - loss) <= 1e-4 * abs(loss), (step, layerwise[step], loss)


def test_llama_pretrain_then_fine_tune(tmp_path, capsys):
  """--pretrain-steps: AdamW language modelling on the manual's other paragraphs, then BAdam
  fine-tuning of that model with the embedding and head frozen."""
  args = LLAMA + ["--gen-tokens", "0", "--stop-at", "2"]
  [scratch] = finetune_llama.main(args + ["--out", str(tmp_path / "scratch")])
  [tuned] = finetune_llama.main(args + ["--out", str(tmp_path / "tuned"), "--pretrain-steps", "4",
                                        "--pretrain-cache", str(tmp_path / "cache")])
  out = capsys.readouterr().out
  assert "pretraining on" in out
  (pretrain,) = (tmp_path / "cache").glob("llama-lm-*/run")  # the pretraining, cached
  assert sorted(_losses(pretrain)) == [1, 2, 3, 4]
  assert tuned["opt_state_bytes"] < scratch["opt_state_bytes"]  # no embedding or head block
  # Two steps logged at once (--log-every 2): the one interval holds the compiling first step.
  # summary.json stays strict JSON, and the median step leaves the first step out.
  summary = json.loads((tmp_path / "scratch" / "summary.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
  assert summary["median_step_s"] > 0
  assert "nan" not in out.lower()


def test_roberta_pretrain_then_fine_tune(tmp_path, capsys):
  """--pretrain-steps: AdamW masked language modelling of the encoder on the manual's paragraphs
  (none of the held-out ones), then BAdam fine-tuning of the classifier with the embedding frozen."""
  import jax
  import numpy as np

  from examples import cli

  args = ROBERTA + ["--stop-at", "2"]
  [scratch] = finetune_roberta.main(args + ["--out", str(tmp_path / "scratch")])
  cache = ["--pretrain-cache", str(tmp_path / "cache")]
  [tuned] = finetune_roberta.main(args + ["--out", str(tmp_path / "tuned"),
                                          "--pretrain-steps", "4", *cache])
  out = capsys.readouterr().out
  assert "pretraining with masked language modelling on" in out
  (pretrain,) = (tmp_path / "cache").glob("roberta-mlm-*/run")  # the pretraining, cached
  pre = [json.loads(line) for line in (pretrain / "metrics.jsonl").open()]
  assert sorted(r["step"] for r in pre if "loss" in r) == [1, 2, 3, 4]
  assert 0 <= [r for r in pre if "eval_loss" in r][-1]["eval_accuracy"] <= 1  # masked tokens
  assert tuned["opt_state_bytes"] < scratch["opt_state_bytes"]  # no embedding block

  # The model handed to every optimizer: the pretrained encoder and a fresh 3-class head.
  cfg = cli.parse_config(finetune_roberta.Config, ROBERTA + [
      "--out", str(tmp_path / "again"), "--pretrain-steps", "4", *cache], "")
  task = finetune_roberta.build_task(cfg)
  model, random_init = task.make_model(), task.make_model()
  assert model.classifier.out_proj.kernel.shape[-1] == 3 and not task.from_scratch
  encoder = lambda m: jax.tree.leaves(m.layers)  # noqa: E731
  assert all(np.array_equal(a, b) for a, b in zip(encoder(model), encoder(random_init),
                                                   strict=True))  # a fresh copy each call
  scratch_cfg = cli.parse_config(finetune_roberta.Config, ROBERTA + [
      "--out", str(tmp_path / "again")], "")
  plain = finetune_roberta.build_task(scratch_cfg).make_model()
  assert not all(np.array_equal(a, b) for a, b in zip(encoder(model), encoder(plain),
                                                       strict=True))  # pretraining changed it


def test_mlm_masking():
  """BERT's masking: 15% of the maskable tokens (at least one per row), 80% <mask>, 10% random,
  10% kept; targets only where chosen."""
  import numpy as np

  from examples import data

  rng = np.random.default_rng(0)
  ids = rng.integers(5, 300, (400, 50)).astype(np.int32)
  maskable = np.ones_like(ids, bool)
  maskable[:, :2] = False  # e.g. <s> and padding
  maskable[:, 40:] = False
  maskable[0] = False  # a row with nothing to mask
  maskable[1, 2] = True
  maskable[1, 3:] = False  # a row with one maskable token: it is chosen
  inputs, targets = data.mask_tokens(ids, rng=np.random.default_rng(1), mask_id=4,
                                     maskable=maskable, vocab=(5, 300))
  chosen = targets >= 0
  assert not (chosen & ~maskable).any() and not chosen[0].any() and chosen[1, 2]
  assert (targets[chosen] == ids[chosen]).all() and (inputs[~chosen] == ids[~chosen]).all()
  assert chosen[2:].any(axis=1).all()
  frac = chosen[2:].sum() / maskable[2:].sum()
  assert 0.13 < frac < 0.17, frac  # ~15,000 Bernoulli(0.15) draws: std 0.003
  masked, same = (inputs[chosen] == 4).mean(), (inputs[chosen] == ids[chosen]).mean()
  assert 0.75 < masked < 0.85 and 0.07 < same < 0.14, (masked, same)  # +~1% random == original
  assert ((inputs[chosen] >= 5) | (inputs[chosen] == 4)).all()  # random ids: never special


def _tiny_checkpoint(tmp_path):
  """A random-init Llama saved as a Hugging Face checkpoint, with its tokenizer."""
  from flax import nnx
  from transformers import PreTrainedTokenizerFast

  from examples import data
  from examples.models import llama

  tok_file = tmp_path / "tok.json"
  tok = data.bpe_tokenizer(["def f(x): return x + 1"] * 20, tok_file, vocab_size=280,
                           special=finetune_llama.SPECIAL, bos="<s>", eos="</s>", pad="<pad>")
  ckpt = tmp_path / "ckpt"
  cfg = llama.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  llama.Llama(cfg, rngs=nnx.Rngs(0)).save_pretrained(ckpt)
  PreTrainedTokenizerFast(tokenizer_file=str(tok_file), bos_token="<s>", eos_token="</s>",
                          pad_token="<pad>").save_pretrained(ckpt)
  return ckpt


def test_llama_from_a_checkpoint_directory_exports_the_result(tmp_path, capsys):
  """--model DIR: HF weights and the checkpoint's own tokenizer; the fine-tuned model (LoRA merged
  in) is exported to <run>/hf, and the export reloads to the model the run evaluated."""
  from transformers import AutoConfig, AutoTokenizer

  from examples import cli
  from examples.models import llama

  ckpt = _tiny_checkpoint(tmp_path)
  data_file = tmp_path / "alpaca.jsonl"
  data_file.write_text("\n".join(json.dumps({"instruction": f"Add {i} and 1.", "input": f"x = {i}",
                                             "output": f"{i + 1}"}) for i in range(12)))
  argv = LLAMA + ["--model", str(ckpt), "--data", str(data_file), "--optimizer", "lora",
                  "--out", str(tmp_path / "r"), "--steps", "2", "--gen-tokens", "2",
                  "--learning-rate", "0.05"]
  [summary] = finetune_llama.main(argv)
  out = capsys.readouterr().out
  assert "\n  input: x = " in out  # a generation shows the input its instruction refers to
  export = tmp_path / "r" / "hf"
  assert f"to {export}" in out
  assert AutoConfig.from_pretrained(export).model_type == "llama"
  hf_tok = AutoTokenizer.from_pretrained(export)
  assert hf_tok("x = 3", add_special_tokens=False)["input_ids"] == AutoTokenizer.from_pretrained(
      ckpt)("x = 3", add_special_tokens=False)["input_ids"]
  # The exported (merged) model gives the eval loss the run measured with the adapters.
  cfg = cli.parse_config(finetune_llama.Config, argv, "")
  task = finetune_llama.build_task(cfg)
  exported = llama.Llama.load_pretrained(export)
  _, stats = finetune_llama.lm_loss(exported, task.eval_data)
  eval_loss = float(stats["nll_sum"]) / float(stats["count"])
  assert abs(eval_loss - summary["eval_loss"]) < 1e-4 * summary["eval_loss"]  # f32 rounding
  before = llama.Llama.load_pretrained(ckpt)  # and training changed it (lr 0.05, LoRA merged)
  _, stats = finetune_llama.lm_loss(before, task.eval_data)
  assert abs(float(stats["nll_sum"]) / float(stats["count"]) - eval_loss) > 1e-3


def test_roberta_compare(tmp_path, capsys, monkeypatch):
  """--compare without --out: its own directory (runs/roberta-compare/<optimizer>), not inside the
  single run's runs/roberta."""
  monkeypatch.chdir(tmp_path)
  out = tmp_path / "runs" / "roberta-compare"
  names = ["adamw", "lora", "adarankgrad"]
  summaries = finetune_roberta.main(ROBERTA + ["--compare", ",".join(names)])
  assert [s["optimizer"] for s in summaries] == names
  assert all(0.0 <= s["eval_accuracy"] <= 1.0 for s in summaries)
  assert (out / "compare.png").is_file() and (out / "compare.md").is_file()
  assert all((out / name / "checkpoints").is_dir() for name in names)
  assert not (tmp_path / "runs" / "roberta").exists()
  text = capsys.readouterr().out
  assert "| eval accuracy |" in text and "| train loss (mean of last 10 steps) |" in text
  by_name = {s["optimizer"]: s for s in summaries}
  assert by_name["lora"]["opt_state_bytes"] < by_name["adamw"]["opt_state_bytes"] / 2
  assert by_name["lora"]["trainable_params"] < by_name["adamw"]["trainable_params"] / 2


@pytest.mark.parametrize("name", ["galore", "badam", "badam_ratio"])
def test_optimizers_step(name):
  import jax
  import jax.numpy as jnp

  from examples import optimizers, training

  params = {"embed_tokens": {"embedding": jnp.ones((8, 4))},
            "layers": {i: {"mlp": {"kernel": jnp.ones((4, 6))}} for i in range(2)}}
  task = training.Task("t", lambda: None, lambda m, b: None, {}, {}, from_scratch=False)
  tx = optimizers.make_optimizer(finetune_roberta.Config(switch_every=1), name, params, task)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):  # the warmup's first learning rate is 0
    updates, state = tx.update(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert any(float(jnp.abs(u).sum()) > 0 for u in jax.tree.leaves(updates))


def test_roberta_pair_encoding():
  from examples import data

  class Chars:
    def get_vocab_size(self):
      return 300

    def encode(self, text, add_special_tokens=True):
      return type("E", (), {"ids": [5 + ord(c) % 250 for c in text]})()

  tok = data.Tokenizer(Chars(), bos=0, eos=2, pad=1)
  rows = [{"premise": "a" * 30, "hypothesis": "bb", "label": True},
          {"text": "hello", "label": False}]
  data = finetune_roberta.encode(rows, tok, 16, {False: 0, True: 1})
  first = list(data["input_ids"][0])
  assert first[0] == 0 and first[-1] == 2 and first.count(2) == 3  # <s> a </s></s> b </s>
  assert first[-3:-1] == [5 + ord("b") % 250] * 2
  assert list(data["attention_mask"][1]) == [1] * 7 + [0] * 9
  assert list(data["labels"]) == [1, 0]


@pytest.mark.parametrize("script, argv, message", [
    (finetune_llama, ["--optimizer", "sgdd"], "unknown optimizer 'sgdd'"),
    (finetune_llama, ["--compare", "adamw,foo"], "--compare: unknown optimizer 'foo'"),
    (finetune_llama, ["--mesh", "data=3,model=4"], "--mesh: mesh spec 'data=3,model=4'"),
    (finetune_llama, ["--mesh", "data=8", "--batch-size", "4"], "must be divisible by the mesh"),
    (finetune_llama, ["--data", "no/such/file.json"], "not found"),
    (finetune_llama, ["--model", "."], "has no config.json"),
    (finetune_roberta, ["--train", "missing.jsonl"], "not found"),
    (finetune_roberta, ["--model", "."], "has no config.json"),
    (finetune_roberta, ["--task", "squad"], "unknown --task 'squad'"),
    (finetune_roberta, ["--pretrain-steps", "-1"], "--pretrain-steps must be >= 0"),
    (finetune_roberta, ["--min-rank", "32"], "--min-rank must be between 1 and --rank"),
    (finetune_llama, ["--resume"], "--resume: nothing to resume"),
    (finetune_roberta, ["--compare", "adamw,badam", "--resume"], "--resume: nothing to resume"),
    (finetune_llama, ["--resume", "--overwrite"], "give one of them"),
    (finetune_llama, ["--layerwise", "--optimizer", "adarankgrad"], "add --scan-layers"),
    (finetune_roberta, ["--layerwise", "--scan-layers"], "--layerwise works with adamw, "
     "adarankgrad, not badam"),
    (finetune_llama, ["--grad-accum", "0"], "--grad-accum must be at least 1"),
])
def test_bad_input_is_one_line(script, argv, message, tmp_path):
  with pytest.raises(SystemExit) as e:
    script.main(argv + ["--out", str(tmp_path)])
  text = str(e.value.code)
  assert message in text and "\n" not in text
  assert not (tmp_path / "tokenizer.json").exists()  # found before building the data


@pytest.mark.parametrize("script", [finetune_llama, finetune_roberta])
def test_help_lists_every_option(script, capsys):
  with pytest.raises(SystemExit) as e:
    script.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for option in ("--optimizer", "--learning-rate", "--mesh", "--resume", "--compare", "--model",
                 "--export", "--overwrite"):
    assert option in text
  flat = " ".join(text.split())  # argparse wraps lines
  assert "(default: None)" not in flat and "DEFAULT_LEARNING_RATES" not in flat
  assert "the library's" not in flat
  assert "default: 0.001 for adamw, adamw_layers; 0.003 for galore" in flat  # the rates themselves


@pytest.mark.parametrize("content", ["{not json", '[{"instruction": "x"}]', "[]"])
def test_malformed_data_file(tmp_path, content):
  path = tmp_path / "data.json"
  path.write_text(content)
  with pytest.raises(SystemExit) as e:
    finetune_llama.main(["--data", str(path), "--out", str(tmp_path)])
  assert str(path) in str(e.value.code) and "\n" not in str(e.value.code)


def test_checkpoint_of_another_model_type(tmp_path):
  fixtures = pathlib.Path(__file__).parent / "fixtures"
  with pytest.raises(SystemExit) as e:
    finetune_llama.main(LLAMA + ["--model", str(fixtures / "roberta"), "--out", str(tmp_path)])
  assert "'roberta' model" in str(e.value.code)


def _run_script(args, **kwargs):
  import os
  import subprocess
  import sys

  env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
  env["PYTHONPATH"] = str(ROOT)
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, capsys):
  """SIGINT during training: a checkpoint at the current step, one line, non-zero exit, no
  traceback; a new run refuses to start over it; --resume continues from it."""
  import signal
  import time

  out = tmp_path / "run"
  args = LLAMA + ["--gen-tokens", "0", "--steps", "100000", "--log-every", "1",
                  "--checkpoint-every", "100000", "--out", str(out)]
  proc = _run_script(["examples/finetune_llama.py", *args])
  metrics = out / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=240)
  assert proc.returncode != 0
  assert "Traceback" not in stderr and "Traceback" not in stdout
  last = stderr.strip().splitlines()[-1]
  match = re.fullmatch(r"interrupted at step (\d+); continue with --resume", last)
  assert match, stderr
  step = int(match.group(1))
  assert step >= 2 and (out / "checkpoints" / str(step)).is_dir()

  with pytest.raises(SystemExit) as e:  # a new run does not delete the interrupted one
    finetune_llama.main(args)
  assert "--resume" in str(e.value.code) and "--overwrite" in str(e.value.code)
  assert (out / "checkpoints" / str(step)).is_dir()

  finetune_llama.main(args + ["--resume", "--steps", str(step + 1)])
  assert f"resumed badam from step {step}" in capsys.readouterr().out
  assert sorted(_losses(out)) == list(range(1, step + 2))


def test_first_output_before_jax():
  """The scripts print what they build before importing NumPy and JAX (seconds on a busy machine),
  and transformers' "PyTorch was not found" advisory is silenced."""
  proc = _run_script(["-c", "import sys; import examples.finetune_llama, examples.finetune_roberta; "
                      "print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))"])
  stdout, stderr = proc.communicate(timeout=120)
  assert stdout.strip() == "[]", stderr
  proc = _run_script(["-c", "from examples.models import base; "
                      "base.read_hf_config('tests/fixtures/llama', ['llama'])"])
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "PyTorch" not in stdout + stderr, stderr


def test_missing_tokenizer_is_named(tmp_path):
  import shutil

  ckpt = tmp_path / "ckpt"
  shutil.copytree(ROOT / "tests" / "fixtures" / "llama", ckpt)
  with pytest.raises(SystemExit) as e:
    finetune_llama.main(["--model", str(ckpt), "--out", str(tmp_path / "r")])
  text = str(e.value.code)
  assert "no tokenizer" in text and "tokenizer.json" in text and "\n" not in text


def test_output_directories():
  from examples import rundir

  single = finetune_llama.Config()
  assert rundir.run_dirs(single) == {"badam": pathlib.Path("runs/llama")}
  assert rundir.export_dir(single, "badam") is None
  cmp = finetune_llama.Config(compare="adamw,badam", export="hf")
  assert rundir.run_dirs(cmp) == {"adamw": pathlib.Path("runs/llama-compare/adamw"),
                                  "badam": pathlib.Path("runs/llama-compare/badam")}
  assert rundir.export_dir(cmp, "adamw") == pathlib.Path("hf/adamw")
  tuned = finetune_llama.Config(model=str(ROOT / "tests" / "fixtures" / "llama"), out="o")
  assert rundir.export_dir(tuned, "badam") == pathlib.Path("o/hf")


@pytest.mark.parametrize("optimizer", ["badam", "adamw"])
def test_llama_grad_accum_runs_and_resumes_exactly(tmp_path, capsys, optimizer):
  """--grad-accum 2: BAdam through its own one-block accumulator (the block step), AdamW through
  optax.MultiSteps; --steps counts optimizer steps, and a stopped run resumes bit-identically."""
  args = LLAMA[:1] + ["4"] + LLAMA[2:] + ["--gen-tokens", "0", "--optimizer", optimizer,
                                          "--grad-accum", "2", "--switch-every", "1"]
  [summary] = finetune_llama.main(args + ["--out", str(tmp_path / "full")])
  assert summary["steps"] == 4
  finetune_llama.main(args + ["--out", str(tmp_path / "cut"), "--stop-at", "2"])
  finetune_llama.main(args + ["--out", str(tmp_path / "cut"), "--resume"])
  assert f"resumed {optimizer} from step 2" in capsys.readouterr().out
  full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
  assert sorted(full) == [1, 2, 3, 4] and cut == full
  if optimizer == "badam":
    [plain] = finetune_llama.main(LLAMA[:1] + ["4"] + LLAMA[2:] + [
        "--gen-tokens", "0", "--switch-every", "1", "--out", str(tmp_path / "plain")])
    # The accumulator is one block's, in the state: more than the plain state by one layer's
    # float32 gradient, never by the model's.
    assert plain["opt_state_bytes"] < summary["opt_state_bytes"] < 2 * plain["opt_state_bytes"]


def test_llama_layerwise_grad_accum_matches_multisteps_and_resumes(tmp_path, capsys):
  """--layerwise --grad-accum 2: the layer-wise step takes both micro-batches at once
  (make_layerwise_step(accumulate=2)) and trains as the ordinary step under optax.MultiSteps does
  (before: refused); a stopped run resumes bit-identically."""
  args = LLAMA[:1] + ["3"] + LLAMA[2:] + ["--gen-tokens", "0", "--optimizer", "adarankgrad",
                                          "--scan-layers", "--clip-norm", "0", "--grad-accum", "2"]
  finetune_llama.main(args + ["--out", str(tmp_path / "multisteps")])
  [summary] = finetune_llama.main(args + ["--out", str(tmp_path / "full"), "--layerwise"])
  assert summary["optimizer"] == "adarankgrad" and summary["steps"] == 3
  finetune_llama.main(args + ["--out", str(tmp_path / "cut"), "--layerwise", "--stop-at", "2"])
  finetune_llama.main(args + ["--out", str(tmp_path / "cut"), "--layerwise", "--resume"])
  assert "resumed adarankgrad from step 2" in capsys.readouterr().out
  multisteps, full, cut = (_losses(tmp_path / d) for d in ("multisteps", "full", "cut"))
  assert sorted(full) == [1, 2, 3] and cut == full
  for step, loss in multisteps.items():
    # AdaRankGrad's per-layer randomized SVD against the stacked one, and the micro-batch
    # gradients summed in another order: float32 rounding.
    assert abs(full[step] - loss) <= 1e-4 * abs(loss), (step, full[step], loss)


def test_roberta_grad_accum_with_an_always_active_head(tmp_path):
  """--grad-accum in the RoBERTa script: BAdam's accumulator holds the active layer and the
  always-active classifier head; --steps counts optimizer steps."""
  [summary] = finetune_roberta.main(ROBERTA + ["--grad-accum", "2", "--steps", "2", "--eval-every",
                                               "2", "--out", str(tmp_path)])
  assert summary["optimizer"] == "badam" and summary["steps"] == 2
  assert sorted(_losses(tmp_path)) == [1, 2]


def test_badam_always_active_options():
  """--no-always-active-head makes a task head one more block, --always-active adds leaves that
  train at every step (also to adamw_layers' set), --no-reset-always-active reaches badam; a
  pattern that matches nothing is one line naming the option."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  from examples import config, optimizers, training

  params = {"embeddings": {"embedding": jnp.ones((8, 4))},
            "layers": {i: {"mlp": {"kernel": jnp.ones((4, 6))}} for i in range(2)},
            "classifier": {"kernel": jnp.ones((4, 3))}}
  task = training.Task("t", lambda: None, lambda m, b: None, {}, {}, head=("classifier",),
                       from_scratch=False)
  cfg = finetune_roberta.Config(switch_every=5)  # the updates below are block 0's

  def labels(**kw):
    out = optimizers.badam_labels(dataclasses.replace(cfg, **kw), params, task)
    return out["embeddings"]["embedding"], out["classifier"]["kernel"]

  assert labels() == (-1, -2)  # embedding frozen, head always active
  assert labels(always_active_head=False) == (-1, 2)  # the head: the block after the layers
  assert labels(always_active="embeddings") == (-2, -2)
  grads = jax.tree.map(jnp.ones_like, params)

  def updates(name, **kw):
    tx = optimizers.make_optimizer(dataclasses.replace(cfg, **kw), name, params, task)
    state = tx.init(params)
    for _ in range(2):  # the warmup's first learning rate is 0
      u, state = tx.update(grads, state, params)
    return u, state

  u, _ = updates("adamw_layers", always_active="embeddings")
  assert float(jnp.abs(u["embeddings"]["embedding"]).sum()) > 0
  u, _ = updates("adamw_layers")
  assert float(jnp.abs(u["embeddings"]["embedding"]).sum()) == 0
  u, _ = updates("badam", always_active_head=False)  # block 0 active: the head waits its turn
  assert float(jnp.abs(u["classifier"]["kernel"]).sum()) == 0
  u, _ = updates("badam")
  assert float(jnp.abs(u["classifier"]["kernel"]).sum()) > 0
  # Kept moments: a second Adam state for the always-active leaves, never reset.
  kept = updates("badam", reset_always_active=False)[1]
  assert len(jax.tree.leaves(kept)) > len(jax.tree.leaves(updates("badam")[1]))
  with pytest.raises(config.UsageError, match=r"--always-active 'nosuch': .*matches no parameter"):
    optimizers.make_optimizer(dataclasses.replace(cfg, always_active="nosuch"), "badam", params, task)
  with pytest.raises(config.UsageError, match="--no-always-active-head: this task has no new task"):
    optimizers.make_optimizer(dataclasses.replace(cfg, always_active_head=False), "badam", params,
                              dataclasses.replace(task, head=()))


def test_badam_schedule_runs_on_the_global_step_in_the_block_step():
  """The examples' BAdam (block step, always-active head): the warmup and the cosine decay follow
  the run's step, neither restarts at a block switch. With a constant gradient every Adam step is
  the learning rate itself (|m_hat / sqrt(v_hat)| = 1, up to eps), for the active layer and the head."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import optax_memopt
  from examples import optimizers, training

  params = {"layers": {i: {"mlp": {"kernel": jnp.ones((4, 6))}} for i in range(3)},
            "classifier": {"kernel": jnp.ones((4, 3))}}
  task = training.Task("t", lambda: None, lambda m, b: None, {}, {}, head=("classifier",),
                       from_scratch=False)
  cfg = finetune_roberta.Config(steps=12, warmup_steps=4, switch_every=3, clip_norm=0.0,
                                learning_rate=1e-2, switch_mode="ascending")
  tx = optimizers.make_optimizer(cfg, "badam", params, task)
  step = optax_memopt.make_block_step(lambda p, batch: sum(x.sum() for x in jax.tree.leaves(p)), tx)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 4, 12, end_value=1e-3)
  state, p = tx.init(params), params
  for t in range(12):
    before = jax.tree.map(np.asarray, p)
    p, state, _ = step(p, state, None)
    moved = [float(np.abs(np.asarray(p["layers"][i]["mlp"]["kernel"]) - before["layers"][i]["mlp"][
        "kernel"]).max()) for i in range(3)]
    head = float(np.abs(np.asarray(p["classifier"]["kernel"]) - before["classifier"]["kernel"]).max())
    expected = float(schedule(t))
    np.testing.assert_allclose([moved[(t // 3) % 3], head], [expected] * 2, rtol=1e-4, atol=1e-7)
    assert sum(m > 0 for m in moved) <= 1
