"""Instruction-tunes a Llama with the loss on the response tokens only.

Default (fully offline): a small random-init Llama, a byte-level BPE trained in seconds, and an
instruction set built from the Python reference manual that ships with Python (``pydoc_data``):
"Explain the Python topic X" → the opening paragraphs of its text. Then prints a greedy generation.

  python examples/finetune_llama.py                         # BAdam on a small random-init Llama
  python examples/finetune_llama.py --optimizer lora --lora-rank 8
  python examples/finetune_llama.py --compare adamw,badam,adarankgrad
  python examples/finetune_llama.py --model DIR --data alpaca.json   # an HF Llama checkpoint
  python examples/finetune_llama.py --mesh data=2,model=4 --cpu-devices 8   # sharded, simulated
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples import cli, config, data, errors, pretraining, rundir
from examples.config import field

# NumPy, JAX, Flax and the model are imported inside the functions that need them: importing
# them takes seconds on a busy machine, and the script says what it builds first.

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SPECIAL = ("<pad>", "<s>", "</s>")


@dataclasses.dataclass
class Config(config.ScriptConfig):
  """The Llama example's options: :class:`~examples.config.ScriptConfig`'s (a field given again
  here takes this script's default and help) and the task's own."""

  MODEL = "Llama"

  name: str = field("llama", "run name: the default run directory is runs/<name>")
  data: str | None = field(None, "Alpaca-format JSON/JSONL (instruction, input, output) or a "
                           "`datasets` hub name; default: built from pydoc_data.topics")
  model: str | None = field(None, "HF Llama checkpoint directory (weights + tokenizer); "
                            "default: a small random-init Llama")
  seq_len: int = field(128, "tokens per example (prompt + response), longer ones are cut")
  num_layers: int = field(4, "random-init model: decoder layers")
  num_kv_heads: int = field(2, "random-init model: key/value heads (grouped-query attention)")
  intermediate_size: int = field(384, "random-init model: MLP hidden size")
  gen_tokens: int = field(64, "tokens to generate after training (0: none)")
  pretrain_steps: int = field(0, "random-init model: first pretrain it for this many AdamW steps "
                              "as a plain language model on the Python reference manual's other "
                              "paragraphs (not the responses), then fine-tune it (embedding and "
                              "head frozen for BAdam, as in the papers' fine-tuning)")

  def __post_init__(self):
    super().__post_init__()
    if self.seq_len < 16:
      raise errors.UsageError("--seq-len must be at least 16")
    if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
      raise errors.UsageError("--hidden-size must be a multiple of --num-heads, and --num-heads "
                              "of --num-kv-heads")


def build_task(cfg: Config):
  """The ``training.Task``: tokenized train/eval split, tokenizer, model factory, generations."""
  import numpy as np

  from examples import sharding, training

  examples = load_examples(cfg)
  if cfg.max_examples:
    examples = examples[:cfg.max_examples]
  order = np.random.default_rng(cfg.seed).permutation(len(examples))
  n_eval = max(1, int(round(cfg.eval_fraction * len(examples))))
  eval_ex = [examples[i] for i in order[:n_eval]]
  train_ex = [examples[i] for i in order[n_eval:]]
  if not train_ex:
    raise errors.UsageError(f"--data {cfg.data}: too few examples ({len(examples)})")
  tok, make_model = tokenizer_and_model(cfg, examples, train_ex)
  print(f"{len(train_ex)} train / {len(eval_ex)} held-out examples, vocabulary {tok.vocab_size}")
  return training.Task(
      name=cfg.name, make_model=make_model, loss_fn=lm_loss,
      train_data=encode(train_ex, tok, cfg.seq_len), eval_data=encode(eval_ex, tok, cfg.seq_len),
      from_scratch=cfg.model is None and not cfg.pretrain_steps,
      after_training=functools.partial(show_generations, cfg, tok, train_ex[0], eval_ex[0]),
      sharding_rules=sharding.LLAMA_RULES, tokenizer=tok)


# ---------------------------------------------------------------------------------------------
# Data: instruction/response pairs, the prompt, the encoding.


def topic_examples() -> list[dict]:
  """Instruction/response pairs from the Python reference manual shipped with Python."""
  from pydoc_data.topics import topics

  examples = []
  for key in sorted(topics):
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", topics[key]) if p.strip()]
    # Skip the title and its underline; keep prose (not grammar or code blocks).
    prose = [" ".join(p.split()) for p in paragraphs[1:]
             if not p.startswith(" ") and "::=" not in p and len(p) > 40]
    if not prose:
      continue
    title = paragraphs[0].splitlines()[0].strip()
    examples.append({"instruction": f"Explain the Python topic \"{key}\".", "input": "",
                     "output": prose[0]})
    if len(prose) > 1:
      examples.append({"instruction": f"What does the reference manual say about {title}?",
                       "input": "", "output": prose[1]})
  return examples


def load_examples(cfg: Config) -> list[dict]:
  if cfg.data is None:
    return topic_examples()
  path = pathlib.Path(cfg.data)
  if path.suffix in (".json", ".jsonl") or path.exists() or "/" not in cfg.data:
    rows = data.read_records(cfg.data, "--data")
  else:
    rows = list(data.load_hub_dataset(cfg.data, split="train"))
  data.check_fields(rows, f"--data {cfg.data}", {"instruction": (str,), "input": (str, type(None)),
                                                "output": (str,)},
                    "Alpaca format: instruction, input, output")
  return rows


def prompt_of(example: dict) -> str:
  if example.get("input"):
    return PROMPT_WITH_INPUT.format(**example)
  return PROMPT.format(instruction=example["instruction"])


def encode(examples: Sequence[dict], tok: data.Tokenizer, seq_len: int,
           prompt_fn=None) -> dict:
  """Prompt + response + eos, right-padded; ``loss_mask`` marks the response tokens.

  ``prompt_fn(example)`` gives the prompt text (default: the instruction prompt); with
  ``lambda ex: ""`` every token after bos is a target (plain language modelling).
  """
  import numpy as np

  prompt_fn = prompt_fn or prompt_of
  n = len(examples)
  ids = np.full((n, seq_len), tok.pad_id, np.int32)
  attention, loss_mask = np.zeros((n, seq_len), np.int32), np.zeros((n, seq_len), np.int32)
  for i, ex in enumerate(examples):
    prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt_fn(ex))
    response = tok.encode(ex["output"]) + ([tok.eos_id] if tok.eos_id is not None else [])
    prompt = prompt[:seq_len // 2]  # keep room for the response
    seq = (prompt + response)[:seq_len]
    ids[i, :len(seq)] = seq
    attention[i, :len(seq)] = 1
    loss_mask[i, len(prompt):len(seq)] = 1
  return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask,
          "weight": np.ones(n, np.float32)}


# ---------------------------------------------------------------------------------------------
# Loss, model, generations.


def lm_loss(model, batch: dict):
  """Mean next-token cross-entropy over the response tokens."""
  import jax.numpy as jnp
  import optax

  ids = batch["input_ids"]
  logits = model(ids[:, :-1], batch["attention_mask"][:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
  w = batch["loss_mask"][:, 1:] * batch["weight"][:, None]
  total, count = jnp.sum(nll * w), jnp.sum(w)
  return total / jnp.maximum(count, 1.0), {"nll_sum": total, "count": count}


def tokenizer_and_model(cfg: Config, examples: Sequence[dict], train_ex: Sequence[dict]):
  """``(tokenizer, make_model)``: ``--model``'s checkpoint, or a BPE trained on the training texts
  and a random-init Llama (pretrained first with ``--pretrain-steps``)."""
  from examples.models import llama

  if cfg.model:
    return pretraining.checkpoint_model(cfg, "llama", llama.Llama)
  texts = [prompt_of(ex) + ex["output"] for ex in train_ex]
  if cfg.pretrain_steps:
    # Pretraining text: the manual's paragraphs that are not responses of the instruction set,
    # so that fine-tuning (and the held-out set) asks for text the model has not seen.
    responses = {" ".join(ex["output"].split()) for ex in examples}
    pretrain_texts = [t for t in data.manual_paragraphs() if t not in responses]
    texts += pretrain_texts
  tok = data.bpe_tokenizer(texts, rundir.output_dir(cfg) / "tokenizer.json",
                           vocab_size=cfg.vocab_size, special=SPECIAL, bos="<s>", eos="</s>",
                           pad="<pad>", single="<s> $A", pair="<s> $A $B", keep=cfg.resume)
  model_cfg = llama.LlamaConfig(
      vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      max_position_embeddings=cfg.seq_len + cfg.gen_tokens, bos_token_id=tok.bos_id,
      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **cfg.model_options())
  make_model = functools.partial(random_llama, model_cfg, cfg.seed)
  if cfg.pretrain_steps:
    make_model = pretraining.PretrainedModel(
        "llama-lm", cfg, model_cfg, tok, pretrain_texts, make_model,
        functools.partial(pretrain_task, cfg, tok, pretrain_texts, make_model))
  return tok, make_model


def random_llama(model_cfg, seed: int):
  from flax import nnx

  from examples.models import llama

  return llama.Llama(model_cfg, rngs=nnx.Rngs(seed))


def pretrain_task(cfg: Config, tok: data.Tokenizer, texts: Sequence[str], make_model, keep):
  """The ``--pretrain-steps`` task: plain language modelling on ``texts`` (a twentieth held out);
  ``keep(model)`` receives the pretrained model."""
  import numpy as np

  from examples import training

  order = np.random.default_rng(cfg.seed).permutation(len(texts))
  rows = encode([{"output": texts[i]} for i in order], tok, cfg.seq_len, prompt_fn=lambda ex: "")
  held = max(1, len(texts) // 20)
  task = training.Task(
      name=f"{cfg.name}-pretrain", loss_fn=lm_loss, make_model=make_model,
      train_data={k: v[held:] for k, v in rows.items()},
      eval_data={k: v[:held] for k, v in rows.items()},
      after_training=lambda model, _: keep(model))
  print(f"pretraining on {len(texts) - held} other paragraphs of the Python reference "
        f"manual ({cfg.pretrain_steps} AdamW steps)")
  return task


def show_generations(cfg: Config, tok: data.Tokenizer, train_example: dict, eval_example: dict,
                     model, optimizer: str) -> None:
  """Prints the trained model's greedy answer to a training and a held-out instruction."""
  from examples.models import llama

  if cfg.gen_tokens <= 0:
    return
  for label, ex in (("train", train_example), ("held-out", eval_example)):
    prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt_of(ex))
    text = tok.decode(llama.generate(model, prompt, cfg.gen_tokens, eos_id=tok.eos_id))
    given = f"\n  input: {ex['input']}" if ex.get("input") else ""
    print(f"\n[{optimizer}, {label}] {ex['instruction']}{given}\n→ {text.strip()}")


# ---------------------------------------------------------------------------------------------
# The command line.


def describe(cfg: Config) -> str:
  """The model and data, for the first line the script prints."""
  if cfg.model:
    model = f"the Llama checkpoint {cfg.model}"
  else:
    model = f"a random-init Llama ({cfg.num_layers} layers, width {cfg.hidden_size})"
    if cfg.pretrain_steps:
      model += f" pretrained for {cfg.pretrain_steps} steps"
  return f"{model} on {cfg.data or 'instructions from the Python reference manual'}"


@errors.main_guard
def main(argv: Sequence[str] | None = None):
  cfg = cli.parse_config(Config, argv, __doc__)
  return cli.launch(cfg, describe(cfg), build_task)


if __name__ == "__main__":
  errors.run_script(main)
