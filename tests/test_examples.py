"""End-to-end runs of the fine-tuning examples with tiny configs (offline, a few steps each)."""

import json
import pathlib

import pytest

from examples import finetune_llama, finetune_roberta

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache(tmp_path_factory):
  """The runs of a test compile the same steps: reuse them across runs (saves most of the time)."""
  import jax

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  yield
  for n, v in before.items():
    jax.config.update(n, v)

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


def test_llama_sharded_on_a_mesh_matches_one_device(tmp_path):
  """--mesh data=2,model=4 on the 8 simulated CPU devices (conftest.py): same losses as one device;
  a sharded run resumes from its checkpoint."""
  args = LLAMA + ["--gen-tokens", "0", "--stop-at", "4"]
  finetune_llama.main(args + ["--out", str(tmp_path / "one")])
  finetune_llama.main(args + ["--out", str(tmp_path / "mesh"), "--mesh", "data=2,model=4"])
  one, mesh = _losses(tmp_path / "one"), _losses(tmp_path / "mesh")
  assert sorted(mesh) == [1, 2, 3, 4]
  for step, loss in one.items():
    assert abs(mesh[step] - loss) <= 1e-4 * abs(loss), (step, mesh[step], loss)
  # Resuming the sharded run restores sharded arrays and continues.
  finetune_llama.main(args[:-2] + ["--out", str(tmp_path / "mesh"), "--mesh", "data=2,model=4",
                                   "--resume"])
  assert sorted(_losses(tmp_path / "mesh")) == list(range(1, 7))


def test_llama_pretrain_then_fine_tune(tmp_path, capsys):
  """--pretrain-steps: AdamW language modelling on the manual's other paragraphs, then BAdam
  fine-tuning of that model with the embedding and head frozen."""
  args = LLAMA + ["--gen-tokens", "0", "--stop-at", "2"]
  [scratch] = finetune_llama.main(args + ["--out", str(tmp_path / "scratch")])
  [tuned] = finetune_llama.main(args + ["--out", str(tmp_path / "tuned"), "--pretrain-steps", "4"])
  assert "pretraining on" in capsys.readouterr().out
  assert sorted(_losses(tmp_path / "tuned" / "pretrain")) == [1, 2, 3, 4]
  assert tuned["opt_state_bytes"] < scratch["opt_state_bytes"]  # no embedding or head block


def test_llama_from_a_checkpoint_directory(tmp_path):
  """--model DIR: HF weights and the checkpoint's own tokenizer."""
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
  data = tmp_path / "alpaca.jsonl"
  data.write_text("\n".join(json.dumps({"instruction": f"Add {i} and 1.", "input": "",
                                        "output": f"{i + 1}"}) for i in range(12)))
  [summary] = finetune_llama.main(LLAMA + ["--model", str(ckpt), "--data", str(data),
                                           "--optimizer", "lora", "--out", str(tmp_path / "r"),
                                           "--steps", "2", "--gen-tokens", "0"])
  assert summary["final_loss"] == summary["final_loss"]  # not NaN


def test_roberta_compare(tmp_path, capsys):
  out = tmp_path / "cmp"
  names = ["adamw", "lora", "adarankgrad"]
  summaries = finetune_roberta.main(ROBERTA + ["--out", str(out), "--compare", ",".join(names)])
  assert [s["optimizer"] for s in summaries] == names
  assert all(0.0 <= s["eval_accuracy"] <= 1.0 for s in summaries)
  assert (out / "compare.png").is_file() and (out / "compare.md").is_file()
  assert "| eval accuracy |" in capsys.readouterr().out
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
])
def test_bad_input_is_one_line(script, argv, message, tmp_path):
  with pytest.raises(SystemExit) as e:
    script.main(argv + ["--out", str(tmp_path)])
  text = str(e.value.code)
  assert message in text and "\n" not in text


@pytest.mark.parametrize("script", [finetune_llama, finetune_roberta])
def test_help_lists_every_option(script, capsys):
  with pytest.raises(SystemExit) as e:
    script.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for option in ("--optimizer", "--learning-rate", "--mesh", "--resume", "--compare", "--model"):
    assert option in text


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
