"""The examples' run directories and command line: what a run directory records, ``--resume`` and
``--overwrite``, one line for every bad input, Ctrl-C at any moment (in a subprocess)."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from examples import checkpoints, data, finetune_llama, finetune_roberta

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parent.parent
LLAMA = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--hidden-size", "32",
         "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1",
         "--intermediate-size", "64", "--vocab-size", "300", "--max-examples", "40",
         "--eval-every", "6", "--checkpoint-every", "3", "--log-every", "2", "--switch-every", "3",
         "--gen-tokens", "0"]


def _one_line_error(script, argv) -> str:
  with pytest.raises(SystemExit) as e:
    script.main(argv)
  text = str(e.value.code)
  assert text.startswith("error: ") and "\n" not in text, text
  return text


# ---------------------------------------------------------------------------------------------
# Bad input: one line, before any heavy work (no tokenizer trained, nothing written).

RECORDS = {
    "output_null": [{"instruction": "a", "input": "", "output": None}],
    "output_number": [{"instruction": "a", "output": 3}],
    "input_number": [{"instruction": "a", "input": 7, "output": "b"}],
    "label_list": [{"text": "a", "label": [1]}, {"text": "b", "label": 0}],
    "text_null": [{"text": None, "label": 1}, {"text": "b", "label": 0}],
}


@pytest.mark.parametrize("script, argv, message", [
    (finetune_llama, ["--dtype", "fp32"], "--dtype 'fp32': choose one of float32, bfloat16"),
    (finetune_roberta, ["--param-dtype", "fp16"], "--param-dtype 'fp16': choose one of"),
    (finetune_llama, ["--mesh", "dat=2,model=4"], "--mesh dat=2,model=4: unknown axis 'dat'"),
    (finetune_llama, ["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (finetune_llama, ["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (finetune_llama, ["--out", "{file}"], "is a file; give a directory"),
    (finetune_llama, ["--export", "{file}"], "--export {file}: {file} is a file"),
    (finetune_roberta, ["--compare", "adamw,lora", "--export", "{file}"], "is a file"),
    (finetune_llama, ["--data", "{dir}"], "is a directory"),
    (finetune_llama, ["--data", "{output_null}"], "record 0's 'output' is null, not text"),
    (finetune_llama, ["--data", "{output_number}"], "record 0's 'output' is int, not text"),
    (finetune_llama, ["--data", "{input_number}"], "record 0's 'input' is int, not text"),
    (finetune_roberta, ["--train", "{label_list}"], "record 0's 'label' is list"),
    (finetune_roberta, ["--train", "{text_null}"], "record 0's 'text' is null, not text"),
])
def test_bad_input_is_one_line(script, argv, message, tmp_path):
  names = {"file": str(tmp_path / "a_file"), "dir": str(tmp_path)}
  (tmp_path / "a_file").write_text("x")
  for name, rows in RECORDS.items():
    names[name] = str(tmp_path / f"{name}.json")
    (tmp_path / f"{name}.json").write_text(json.dumps(rows))
  argv = [a.format(**names) for a in argv]
  out = tmp_path / "run"
  if "--out" not in argv:
    argv += ["--out", str(out)]
  text = _one_line_error(script, LLAMA + argv if script is finetune_llama else argv)
  assert message.format(**names) in text
  assert not (out / "tokenizer.json").exists() and not (out / "checkpoints").exists()


def test_help_is_current(capsys):
  with pytest.raises(SystemExit):
    finetune_llama.main(["--help"])
  flat = " ".join(capsys.readouterr().out.split())
  assert "nnx.scan" not in flat and "optax_memopt.scan_layers" in flat  # --scan-layers
  for option, default in (("--vocab-size", "1024"), ("--name", "llama"), ("--seq-len", "128")):
    assert re.search(rf"{option} \S+ [^-]*\(default: {default}\)", flat), option


def test_the_screen_says_when_a_run_is_layerwise_or_unclipped(capsys, tmp_path):
  # --mesh data=3 does not fit the devices: the run stops after its first lines, nothing built.
  for argv, line in ((["--layerwise", "--scan-layers", "--optimizer", "adamw"],
                     "layer-wise: the optimizer runs inside the backward pass, layer by layer; "
                     "global-norm clipping is off"),
                    (["--clip-norm", "0"], "no global-norm clipping (--clip-norm 0)")):
    assert "--mesh" in _one_line_error(finetune_llama, argv + ["--mesh", "data=3", "--out",
                                                               str(tmp_path)])
    assert line in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# What a run directory holds.


def test_tokenizer_is_reused_only_for_the_same_texts_and_options(tmp_path, capsys):
  path = tmp_path / "tokenizer.json"
  texts = ["def f(x): return x + 1", "class A: pass", "while True: break"] * 10
  options = dict(special=("<pad>", "<s>", "</s>"), bos="<s>", eos="</s>", pad="<pad>")
  first = data.bpe_tokenizer(texts, path, vocab_size=280, **options)
  provenance = json.loads((tmp_path / "tokenizer.provenance.json").read_text())
  assert provenance["vocab_size"] == 280 and len(provenance["texts_sha256"]) == 64
  stamp = path.stat().st_mtime_ns
  again = data.bpe_tokenizer(texts, path, vocab_size=280, keep=True, **options)
  assert path.stat().st_mtime_ns == stamp and again.vocab_size == first.vocab_size
  assert "training a new tokenizer" not in capsys.readouterr().out

  for changed, why in ((dict(texts=texts[:3]), "was trained on other texts"),
                       (dict(vocab_size=300), "vocab_size 280 -> 300"),
                       (dict(single="<s> $A"), "single None -> <s> $A")):
    with pytest.raises(Exception, match=re.escape(why)):  # a resumed run's checkpoint needs the old one
      data.bpe_tokenizer(**{"texts": texts, "path": path, "vocab_size": 280, "keep": True,
                            **options, **changed})
    data.bpe_tokenizer(**{"texts": texts, "path": path, "vocab_size": 280, **options, **changed})
    said = capsys.readouterr().out
    assert said.startswith(f"training a new tokenizer: {path} ") and why in said, said
    data.bpe_tokenizer(texts, path, vocab_size=280, **options)  # back to the first
    capsys.readouterr()
  (tmp_path / "tokenizer.provenance.json").unlink()  # a tokenizer of unknown origin
  data.bpe_tokenizer(texts, path, vocab_size=280, **options)
  assert "has no provenance record" in capsys.readouterr().out


def test_overwrite_removes_everything_the_old_run_wrote(tmp_path):
  out = tmp_path / "run"
  for name in ("config.json", "metrics.jsonl", "summary.json", "tokenizer.json",
               "tokenizer.provenance.json", "notes.txt"):
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("{}")
  for name in ("checkpoints/3", "hf", "pretrain/checkpoints/4", "adamw/checkpoints/2"):
    (out / name).mkdir(parents=True)
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(RECORDS["output_null"]))
  # The old run is gone once the run starts (here it then stops at the bad data).
  _one_line_error(finetune_llama, LLAMA + ["--out", str(out), "--overwrite", "--data", str(bad)])
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
  options = json.loads((out / "config.json").read_text())["options"]  # the new run's
  assert options["data"] == str(bad) and "overwrite" not in options


# The refused restore at the end leaves orbax's read coroutines to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_restores_the_recorded_options(tmp_path, capsys):
  out = tmp_path / "run"
  run = ["--out", str(out)]
  finetune_llama.main(LLAMA + run + ["--stop-at", "2", "--learning-rate", "0.01"])
  record = json.loads((out / "config.json").read_text())
  assert record["script"] == "finetune_llama.py"
  assert record["options"]["hidden_size"] == 32 and record["options"]["learning_rate"] == 0.01
  assert "stop_at" not in record["options"] and "resume" not in record["options"]

  # An option that contradicts the record: one line, nothing touched.
  for argv, message in ((["--optimizer", "adamw"], "--optimizer adamw contradicts the run's "
                                                   "--optimizer badam"),
                        (["--scan-layers"], "--scan-layers contradicts the run's --no-scan-layers"),
                        (["--learning-rate", "0.1"], "--learning-rate 0.1 contradicts the run's "
                                                     "--learning-rate 0.01")):
    assert message in _one_line_error(finetune_llama, run + ["--resume"] + argv)
  assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [2]

  # --resume alone: the recorded options (a 6-step run of the tiny model) continue.
  finetune_llama.main(run + ["--resume"])
  assert "resumed badam from step 2" in capsys.readouterr().out
  metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
  assert sorted(r["step"] for r in metrics if "loss" in r) == [1, 2, 3, 4, 5, 6]

  # A finished run resumed: nothing happens, and it says so.
  summary = (out / "summary.json").read_bytes()
  stamp = (out / "summary.json").stat().st_mtime_ns
  [again] = finetune_llama.main(run + ["--resume"])
  assert "is finished" in capsys.readouterr().out
  assert (out / "summary.json").read_bytes() == summary
  assert (out / "summary.json").stat().st_mtime_ns == stamp and again == json.loads(summary)

  # --steps may change (the run is extended), and the record says so.
  finetune_llama.main(run + ["--resume", "--steps", "7"])
  assert "--steps 7 (the run had --steps 6; recorded)" in capsys.readouterr().out
  assert json.loads((out / "config.json").read_text())["options"]["steps"] == 7
  assert json.loads((out / "summary.json").read_text())["steps"] == 7

  # A run directory without a record (an older version's): a checkpoint that does not fit the
  # model these options build is one line, not orbax's traceback.
  (out / "config.json").unlink()
  text = _one_line_error(finetune_llama, LLAMA + run + ["--resume", "--steps", "9",
                                                        "--hidden-size", "64"])
  assert "does not fit the model and optimizer" in text
  assert not (out / "config.json").exists()  # a resumed run without a record does not make one
  text = _one_line_error(finetune_llama, LLAMA + run + ["--resume", "--steps", "9",
                                                        "--optimizer", "adamw"])
  assert "holds a badam run, not adamw" in text


def test_export_has_normal_permissions(tmp_path):
  from examples.models import llama

  model = llama.Llama.load_pretrained(ROOT / "tests" / "fixtures" / "llama")
  export = tmp_path / "hf"
  checkpoints.export_hf(model, None, export)
  umask = os.umask(0)
  os.umask(umask)
  for name in ("config.json", "model.safetensors"):
    assert (export / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial export left


# ---------------------------------------------------------------------------------------------
# Ctrl-C, in a subprocess as a user presses it.


def _start(argv):
  env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
  env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "examples/finetune_llama.py", *argv], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_clean_end(proc, stdout, stderr, last_line):
  assert proc.returncode != 0
  for text in (stdout, stderr):
    assert "Traceback" not in text and "Exception ignored" not in text, stderr
  assert re.fullmatch(last_line, stderr.strip().splitlines()[-1]), stderr


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.6, 1.0, 1.5])
def test_ctrl_c_during_the_import_of_jax_ends_with_one_line(tmp_path, delay):
  """The first line is printed just before JAX is imported (a second or two): a Ctrl-C then used
  to be swallowed by JAX (the run went on) or to end in an ImportError traceback."""
  proc = _start(LLAMA + ["--steps", "2", "--out", str(tmp_path / "run")])
  assert proc.stdout.readline().startswith("llama: fine-tuning")
  time.sleep(delay)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=240)
  _assert_clean_end(proc, stdout, stderr, r"interrupted; nothing saved since the last checkpoint")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_second_ctrl_c_does_not_cut_the_save_short(tmp_path):
  out = tmp_path / "run"
  proc = _start(LLAMA + ["--steps", "100000", "--log-every", "1", "--checkpoint-every", "100000",
                         "--out", str(out)])
  metrics = out / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.1)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=240)
  _assert_clean_end(proc, stdout, stderr, r"interrupted at step \d+; continue with --resume")
  assert "Ctrl-C again: stopping at the next safe point" in stderr
  step = int(re.search(r"at step (\d+)", stderr.strip().splitlines()[-1]).group(1))
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [str(step)]  # whole, no tmp


def test_resume_reads_the_record_first(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"script": "finetune_roberta.py",
                                                    "options": {"hidden_size": 64}}))
  text = _one_line_error(finetune_llama, ["--out", str(tmp_path), "--resume"])
  assert "is a run of finetune_roberta.py; resume it with that script" in text
  (tmp_path / "config.json").write_text("{not json")
  assert "is not a run configuration" in _one_line_error(finetune_llama,
                                                          ["--out", str(tmp_path), "--resume"])
  # The record is read before the options given are checked: --layerwise is valid with its
  # --scan-layers (here the run then has nothing to resume).
  (tmp_path / "config.json").write_text(json.dumps({"script": "finetune_llama.py", "options": {
      "optimizer": "adamw", "scan_layers": True, "layerwise": True}}))
  assert "nothing to resume" in _one_line_error(finetune_llama, ["--out", str(tmp_path),
                                                                 "--resume", "--layerwise"])
