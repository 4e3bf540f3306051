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
import pathlib
import re
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples import config, data
from examples.config import field

# NumPy, JAX, Flax and the model are imported inside the functions that need them: importing
# them takes seconds on a busy machine, and the script says what it builds first.

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SPECIAL = ("<pad>", "<s>", "</s>")


@dataclasses.dataclass
class Config(config.TrainConfig):
  name: str = field("llama", "run name: the default run directory is runs/<name>")
  data: str | None = field(None, "Alpaca-format JSON/JSONL (instruction, input, output) or a "
                           "`datasets` hub name; default: built from pydoc_data.topics")
  model: str | None = field(None, "HF Llama checkpoint directory (weights + tokenizer); "
                            "default: a small random-init Llama")
  seq_len: int = field(128, "tokens per example (prompt + response), longer ones are cut")
  eval_fraction: float = field(0.1, "held-out fraction of the examples")
  vocab_size: int = field(1024, "BPE vocabulary of the default tokenizer")
  hidden_size: int = field(128, "random-init model: hidden size")
  num_layers: int = field(4, "random-init model: decoder layers")
  num_heads: int = field(4, "random-init model: attention heads")
  num_kv_heads: int = field(2, "random-init model: key/value heads (grouped-query attention)")
  intermediate_size: int = field(384, "random-init model: MLP hidden size")
  param_dtype: str = field("float32", "parameter dtype: float32 or bfloat16",
                           choices=config.DTYPES)
  dtype: str = field("float32", "compute dtype: float32 or bfloat16", choices=config.DTYPES)
  remat: bool = field(False, "rematerialise each layer in the backward pass")
  scan_layers: bool = field(False, "stack the layers ([L, ...] weights) and run them with "
                            "optax_memopt.scan_layers: BAdam's block step compiles once for all "
                            "layer blocks; needed by --layerwise")
  gen_tokens: int = field(64, "tokens to generate after training (0: none)")
  pretrain_steps: int = field(0, "random-init model: first pretrain it for this many AdamW steps "
                              "as a plain language model on the Python reference manual's other "
                              "paragraphs (not the responses), then fine-tune it (embedding and "
                              "head frozen for BAdam, as in the papers' fine-tuning)")

  pretrain_cache: str | None = field(None, "folder of the --pretrain-steps cache: the pretrained "
                                     "weights are kept once per pretraining configuration and "
                                     "reused (default: $OPTAX_MEMOPT_PRETRAIN_CACHE or "
                                     "runs/pretrained)")

  def __post_init__(self):
    super().__post_init__()
    if self.layerwise and not self.scan_layers:
      raise config.UsageError("--layerwise updates the layer stack inside its backward scan: "
                              "add --scan-layers")
    if self.seq_len < 16:
      raise config.UsageError("--seq-len must be at least 16")
    if not 0 < self.eval_fraction < 1:
      raise config.UsageError("--eval-fraction must be between 0 and 1")
    if self.model is not None and not (pathlib.Path(self.model) / "config.json").is_file():
      raise config.UsageError(f"--model {self.model} has no config.json; pass the directory of a "
                              "Hugging Face Llama checkpoint")
    if self.pretrain_steps < 0:
      raise config.UsageError("--pretrain-steps must be >= 0")
    if self.pretrain_steps and self.model is not None:
      raise config.UsageError("--pretrain-steps is for the random-init model; --model is "
                              "pretrained already")
    if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
      raise config.UsageError("--hidden-size must be a multiple of --num-heads, and --num-heads "
                              "of --num-kv-heads")


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


def manual_paragraphs() -> list[str]:
  """Every prose paragraph of the Python reference manual shipped with Python (``pydoc_data``)."""
  from pydoc_data.topics import topics

  out = []
  for key in sorted(topics):
    for p in re.split(r"\n\s*\n", topics[key]):
      if p.strip() and not p.startswith(" ") and "::=" not in p and len(p) > 40:
        out.append(" ".join(p.split()))
  return out


def pretrained_model_factory(cfg: Config, tok: data.Tokenizer, model_cfg, out: pathlib.Path,
                             texts: Sequence[str]):
  """``make_model`` for ``--pretrain-steps``: AdamW language modelling on ``texts``, once; every
  call returns a fresh copy of the pretrained model."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from examples import training
  from examples.models import llama

  cache: dict = {}

  def make_model():
    if "state" not in cache:
      from examples import pretraining

      pre_cfg = dataclasses.replace(
          cfg, optimizer="adamw", steps=cfg.pretrain_steps, learning_rate=None, compare="",
          stop_at=None, resume=False, overwrite=True, export=None, eval_every=cfg.pretrain_steps,
          checkpoint_every=cfg.pretrain_steps, warmup_steps=min(cfg.warmup_steps,
                                                                cfg.pretrain_steps // 10))
      make_lm = lambda: llama.Llama(model_cfg, rngs=nnx.Rngs(cfg.seed))  # noqa: E731

      def pretrain_task(keep):
        order = np.random.default_rng(cfg.seed).permutation(len(texts))
        rows = encode([{"output": texts[i]} for i in order], tok, cfg.seq_len,
                      prompt_fn=lambda ex: "")
        held = max(1, len(texts) // 20)
        pre_task = training.Task(
            name=f"{cfg.name}-pretrain", loss_fn=lm_loss, make_model=make_lm,
            train_data={k: v[held:] for k, v in rows.items()},
            eval_data={k: v[:held] for k, v in rows.items()},
            after_training=lambda model, _: keep(model))
        print(f"pretraining on {len(texts) - held} other paragraphs of the Python reference "
              f"manual ({cfg.pretrain_steps} AdamW steps)")
        return pre_task

      cache["graphdef"], cache["state"] = pretraining.pretrained_state(
          "llama-lm", cfg, pre_cfg, model_cfg, tok, texts, make_lm, pretrain_task, cfg.pretrain_cache)
    return nnx.merge(cache["graphdef"], jax.tree.map(jnp.copy, cache["state"]))

  return make_model


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


def build_task(cfg: Config):
  """The ``training.Task``: tokenized train/eval split, tokenizer, model factory, generations."""
  import numpy as np
  from flax import nnx

  from examples import sharding, training
  from examples.models import base, llama

  out = config.output_dir(cfg)
  examples = load_examples(cfg)
  if cfg.max_examples:
    examples = examples[:cfg.max_examples]
  order = np.random.default_rng(cfg.seed).permutation(len(examples))
  n_eval = max(1, int(round(cfg.eval_fraction * len(examples))))
  eval_ex = [examples[i] for i in order[:n_eval]]
  train_ex = [examples[i] for i in order[n_eval:]]
  if not train_ex:
    raise config.UsageError(f"--data {cfg.data}: too few examples ({len(examples)})")

  options = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat,
                 scan_layers=cfg.scan_layers)
  if cfg.model:
    try:
      base.read_hf_config(cfg.model, ["llama"])
    except ValueError as e:
      raise config.UsageError(f"--model: {e}") from None
    tok = data.pretrained_tokenizer(cfg.model)

    def make_model():
      try:
        return llama.Llama.load_pretrained(cfg.model, seed=cfg.seed, **options)
      except ValueError as e:
        raise config.UsageError(f"--model: {e}") from None
  else:
    texts = [prompt_of(ex) + ex["output"] for ex in train_ex]
    if cfg.pretrain_steps:
      # Pretraining text: the manual's paragraphs that are not responses of the instruction set,
      # so that fine-tuning (and the held-out set) asks for text the model has not seen.
      responses = {" ".join(ex["output"].split()) for ex in examples}
      pretrain_texts = [t for t in manual_paragraphs() if t not in responses]
      texts += pretrain_texts
    tok = data.bpe_tokenizer(texts, out / "tokenizer.json", vocab_size=cfg.vocab_size,
                             special=SPECIAL, bos="<s>", eos="</s>", pad="<pad>",
                             single="<s> $A", pair="<s> $A $B", keep=cfg.resume)
    model_cfg = llama.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.seq_len + cfg.gen_tokens, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **options)

    def make_model():
      return llama.Llama(model_cfg, rngs=nnx.Rngs(cfg.seed))

    if cfg.pretrain_steps:
      make_model = pretrained_model_factory(cfg, tok, model_cfg, out, pretrain_texts)

  def show_generations(model, optimizer: str) -> None:
    if cfg.gen_tokens <= 0:
      return
    for label, ex in (("train", train_ex[0]), ("held-out", eval_ex[0])):
      prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt_of(ex))
      text = tok.decode(llama.generate(model, prompt, cfg.gen_tokens, eos_id=tok.eos_id))
      given = f"\n  input: {ex['input']}" if ex.get("input") else ""
      print(f"\n[{optimizer}, {label}] {ex['instruction']}{given}\n→ {text.strip()}")

  print(f"{len(train_ex)} train / {len(eval_ex)} held-out examples, vocabulary {tok.vocab_size}")
  return training.Task(
      name=cfg.name, make_model=make_model, loss_fn=lm_loss,
      train_data=encode(train_ex, tok, cfg.seq_len), eval_data=encode(eval_ex, tok, cfg.seq_len),
      from_scratch=cfg.model is None and not cfg.pretrain_steps, after_training=show_generations,
      sharding_rules=sharding.LLAMA_RULES, tokenizer=tok)


def describe(cfg: Config) -> str:
  """The model and data, for the first line the script prints."""
  if cfg.model:
    model = f"the Llama checkpoint {cfg.model}"
  else:
    model = f"a random-init Llama ({cfg.num_layers} layers, width {cfg.hidden_size})"
    if cfg.pretrain_steps:
      model += f" pretrained for {cfg.pretrain_steps} steps"
  return f"{model} on {cfg.data or 'instructions from the Python reference manual'}"


@config.main_guard
def main(argv: Sequence[str] | None = None):
  cfg = config.parse_config(Config, argv, __doc__)
  return config.launch(cfg, describe(cfg), build_task)


if __name__ == "__main__":
  config.run_script(main)
