"""Fine-tunes RoBERTa for sequence classification and reports held-out accuracy.

Default (fully offline): a small random-init RoBERTa and a BPE trained in seconds, on a task built
from the Python reference manual that ships with Python (``pydoc_data``): which part of the manual
(statements, expressions, data model & types) a paragraph comes from.

  python examples/finetune_roberta.py                          # BAdam
  python examples/finetune_roberta.py --compare adamw,badam,lora
  python examples/finetune_roberta.py --train train.jsonl --eval dev.jsonl   # text/label or
                                                               # premise/hypothesis/label rows
  python examples/finetune_roberta.py --task rte --model DIR   # SuperGLUE via `datasets`
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

SPECIAL = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's ids 0..4 (pad = 1)
# SuperGLUE tasks with one or two text fields and a label (hub dataset "aps/super_glue").
SUPERGLUE = {"boolq": ("passage", "question"), "cb": ("premise", "hypothesis"),
             "rte": ("premise", "hypothesis"), "wic": ("sentence1", "sentence2")}
STATEMENTS = {"assert", "assignment", "async", "augassign", "break", "class", "compound",
              "continue", "del", "else", "for", "function", "global", "if", "import", "nonlocal",
              "pass", "raise", "return", "try", "while", "with", "yield"}
EXPRESSIONS = {"atom-identifiers", "atom-literals", "attribute-references", "await", "binary",
               "bitwise", "booleans", "calls", "comparisons", "exprlists", "floating",
               "formatstrings", "identifiers", "imaginary", "in", "integers", "lambda", "lists",
               "dict", "operator-summary", "power", "shifting", "slicings", "strings",
               "subscriptions", "unary", "conversions"}
TOPIC_CLASSES = ("statements", "expressions", "data model & types")


@dataclasses.dataclass
class Config(config.TrainConfig):
  name: str = field("roberta", "run name: the default run directory is runs/<name>")
  task: str = field("topics", "'topics' (offline default) or a SuperGLUE task loaded with "
                    f"`datasets`: {', '.join(SUPERGLUE)}")
  train: str | None = field(None, "training JSONL (text/label or premise/hypothesis/label)")
  eval: str | None = field(None, "evaluation JSONL (same fields); default: held out of --train")
  model: str | None = field(None, "HF RoBERTa checkpoint directory (weights + tokenizer); "
                            "default: a small random-init RoBERTa")
  seq_len: int = field(96, "tokens per example, longer ones are cut")
  eval_fraction: float = field(0.2, "held-out fraction when there is no separate eval set")
  vocab_size: int = field(2048, "BPE vocabulary of the default tokenizer")
  hidden_size: int = field(128, "random-init model: hidden size")
  num_layers: int = field(4, "random-init model: encoder layers")
  num_heads: int = field(4, "random-init model: attention heads")
  intermediate_size: int = field(256, "random-init model: MLP hidden size")
  param_dtype: str = field("float32", "parameter dtype: float32 or bfloat16")
  dtype: str = field("float32", "compute dtype: float32 or bfloat16")
  remat: bool = field(False, "rematerialise each layer in the backward pass")
  scan_layers: bool = field(False, "stack the layers and run them with nnx.scan")

  def __post_init__(self):
    super().__post_init__()
    if self.layerwise and not self.scan_layers:
      raise config.UsageError("--layerwise updates the layer stack inside its backward scan: "
                              "add --scan-layers")
    if self.task != "topics" and self.task not in SUPERGLUE and self.train is None:
      raise config.UsageError(f"unknown --task {self.task!r}; use topics, "
                              f"{', '.join(SUPERGLUE)}, or --train FILE")
    if self.eval is not None and self.train is None:
      raise config.UsageError("--eval needs --train")
    if not 0 < self.eval_fraction < 1:
      raise config.UsageError("--eval-fraction must be between 0 and 1")
    if self.model is not None and not (pathlib.Path(self.model) / "config.json").is_file():
      raise config.UsageError(f"--model {self.model} has no config.json; pass the directory of a "
                              "Hugging Face RoBERTa checkpoint")


def topic_rows() -> list[dict]:
  """Paragraphs of the Python reference manual, labelled by the part of the manual they are from."""
  from pydoc_data.topics import topics

  rows = []
  for key in sorted(topics):
    label = 0 if key in STATEMENTS else 1 if key in EXPRESSIONS else 2
    for p in re.split(r"\n\s*\n", topics[key])[1:]:
      text = " ".join(p.split())
      if len(text) > 80 and "::=" not in text:
        rows.append({"text": text, "label": label})
  return rows


def _hub_rows(task: str) -> tuple[list[dict], list[dict]]:
  ds = data.load_hub_dataset("aps/super_glue", task)
  a, b = SUPERGLUE[task]
  convert = lambda split: [{"premise": r[a], "hypothesis": r[b], "label": r["label"]}
                           for r in ds[split]]
  return convert("train"), convert("validation")


def _check_rows(rows: list[dict], what: str) -> None:
  for i, r in enumerate(rows):
    if "label" not in r or not ("text" in r or ("premise" in r and "hypothesis" in r)):
      raise config.UsageError(f"{what}: record {i} needs 'label' and 'text' (or 'premise' and "
                              "'hypothesis')")


def load_rows(cfg: Config) -> tuple[list[dict], list[dict] | None]:
  if cfg.train is not None:
    train = data.read_records(cfg.train, "--train")
    _check_rows(train, f"--train {cfg.train}")
    evals = None
    if cfg.eval is not None:
      evals = data.read_records(cfg.eval, "--eval")
      _check_rows(evals, f"--eval {cfg.eval}")
    return train, evals
  if cfg.task == "topics":
    return topic_rows(), None
  return _hub_rows(cfg.task)


def encode(rows: Sequence[dict], tok: data.Tokenizer, seq_len: int,
           label_ids: dict) -> dict:
  """``<s> text </s>`` or ``<s> premise </s></s> hypothesis </s>``, right-padded."""
  import numpy as np

  n = len(rows)
  ids = np.full((n, seq_len), tok.pad_id, np.int32)
  for i, r in enumerate(rows):
    if "text" in r:
      seq = [tok.bos_id] + tok.encode(r["text"])[:seq_len - 2] + [tok.eos_id]
    else:
      a, b = tok.encode(r["premise"]), tok.encode(r["hypothesis"])
      budget = seq_len - 4
      b = b[:max(budget // 2, budget - len(a))]
      seq = [tok.bos_id] + a[:budget - len(b)] + [tok.eos_id, tok.eos_id] + b + [tok.eos_id]
    ids[i, :len(seq)] = seq
  return {"input_ids": ids, "attention_mask": (ids != tok.pad_id).astype(np.int32),
          "labels": np.array([label_ids[r["label"]] for r in rows], np.int32),
          "weight": np.ones(n, np.float32)}


def classification_loss(model, batch: dict):
  """Mean cross-entropy of the class logits; the stats count correct predictions too."""
  import jax.numpy as jnp
  import optax

  logits = model(batch["input_ids"], batch["attention_mask"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  w = batch["weight"]
  correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * w)
  total, count = jnp.sum(nll * w), jnp.sum(w)
  return total / jnp.maximum(count, 1.0), {"nll_sum": total, "count": count, "correct": correct}


def build_task(cfg: Config):
  """The ``training.Task``: tokenized train/eval split, tokenizer, model factory."""
  import numpy as np
  from flax import nnx

  from examples import training
  from examples.models import base, roberta

  out = config.output_dir(cfg)
  train_rows, eval_rows = load_rows(cfg)
  if cfg.max_examples:  # a random subset: the default rows are grouped by label
    keep = np.random.default_rng(cfg.seed).permutation(len(train_rows))[:cfg.max_examples]
    train_rows = [train_rows[i] for i in sorted(keep)]
  if eval_rows is None:
    order = np.random.default_rng(cfg.seed).permutation(len(train_rows))
    n_eval = max(1, int(round(cfg.eval_fraction * len(train_rows))))
    eval_rows = [train_rows[i] for i in order[:n_eval]]
    train_rows = [train_rows[i] for i in order[n_eval:]]
  labels = sorted({r["label"] for r in train_rows + eval_rows}, key=str)
  label_ids = {label: i for i, label in enumerate(labels)}
  if len(labels) < 2:
    raise config.UsageError("the data has a single label; classification needs at least two")

  options = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat,
                 scan_layers=cfg.scan_layers)
  if cfg.model:
    try:
      base.read_hf_config(cfg.model, ["roberta"])
    except ValueError as e:
      raise config.UsageError(f"--model: {e}") from None
    tok = data.pretrained_tokenizer(cfg.model)

    def make_model():
      try:
        return roberta.Roberta.load_pretrained(cfg.model, seed=cfg.seed, num_labels=len(labels),
                                               **options)
      except ValueError as e:
        raise config.UsageError(f"--model: {e}") from None
  else:
    texts = [r.get("text") or f"{r['premise']} {r['hypothesis']}" for r in train_rows]
    tok = data.bpe_tokenizer(texts, out / "tokenizer.json", vocab_size=cfg.vocab_size,
                             special=SPECIAL, bos="<s>", eos="</s>", pad="<pad>",
                             single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                             unk_token="<unk>", mask_token="<mask>")
    model_cfg = roberta.RobertaConfig(
        vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.seq_len + tok.pad_id + 1, pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, num_labels=len(labels), **options)

    def make_model():
      return roberta.Roberta(model_cfg, rngs=nnx.Rngs(cfg.seed))

  topics = cfg.train is None and cfg.task == "topics"
  names = [TOPIC_CLASSES[label] for label in labels] if topics else labels
  train_data = encode(train_rows, tok, cfg.seq_len, label_ids)
  eval_data = encode(eval_rows, tok, cfg.seq_len, label_ids)
  majority = np.bincount(eval_data["labels"]).max() / len(eval_rows)
  print(f"{len(train_rows)} train / {len(eval_rows)} eval examples, {len(labels)} classes "
        f"(majority-class accuracy {majority:.3f})")
  return training.Task(name=cfg.name, make_model=make_model, loss_fn=classification_loss,
                       train_data=train_data, eval_data=eval_data, head=("classifier",),
                       from_scratch=cfg.model is None, tokenizer=tok, labels=names)


def describe(cfg: Config) -> str:
  """The model and data, for the first line the script prints."""
  model = (f"the RoBERTa checkpoint {cfg.model}" if cfg.model else
           f"a random-init RoBERTa ({cfg.num_layers} layers, width {cfg.hidden_size})")
  if cfg.train:
    task = cfg.train
  elif cfg.task == "topics":
    task = "classifying paragraphs of the Python reference manual"
  else:
    task = f"SuperGLUE {cfg.task}"
  return f"{model} on {task}"


@config.main_guard
def main(argv: Sequence[str] | None = None):
  cfg = config.parse_config(Config, argv, __doc__)
  return config.launch(cfg, describe(cfg), build_task)


if __name__ == "__main__":
  main()
