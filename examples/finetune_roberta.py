"""Fine-tunes RoBERTa for sequence classification and reports held-out accuracy.

Default (fully offline): a small random-init RoBERTa and a BPE trained in seconds, on a task built
from the Python reference manual that ships with Python (``pydoc_data``): which part of the manual
(statements, expressions, data model & types) a paragraph comes from.

  python examples/finetune_roberta.py                          # BAdam
  python examples/finetune_roberta.py --compare adamw,badam,lora
  python examples/finetune_roberta.py --pretrain-steps 600     # masked-LM pretraining first
  python examples/finetune_roberta.py --train train.jsonl --eval dev.jsonl   # text/label or
                                                               # premise/hypothesis/label rows
  python examples/finetune_roberta.py --task rte --model DIR   # SuperGLUE via `datasets`
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
class Config(config.ScriptConfig):
  """The RoBERTa example's options: :class:`~examples.config.ScriptConfig`'s (a field given again
  here takes this script's default and help) and the task's own."""

  MODEL = "RoBERTa"

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
  num_layers: int = field(4, "random-init model: encoder layers")
  pretrain_steps: int = field(0, "random-init model: first pretrain it for this many AdamW steps "
                              "with masked language modelling on the Python reference manual's "
                              "paragraphs (--train's texts for other data; never the held-out "
                              "ones), then fine-tune the classifier (embedding frozen for BAdam, "
                              "as in the papers' fine-tuning)")

  def __post_init__(self):
    super().__post_init__()
    if self.task != "topics" and self.task not in SUPERGLUE and self.train is None:
      raise errors.UsageError(f"unknown --task {self.task!r}; use topics, "
                              f"{', '.join(SUPERGLUE)}, or --train FILE")
    if self.eval is not None and self.train is None:
      raise errors.UsageError("--eval needs --train")

  @property
  def topics(self) -> bool:
    """The offline default task (no --train): classifying the manual's paragraphs."""
    return self.train is None and self.task == "topics"


def build_task(cfg: Config):
  """The ``training.Task``: tokenized train/eval split, tokenizer, model factory."""
  import numpy as np

  from examples import training

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
    raise errors.UsageError("the data has a single label; classification needs at least two")
  tok, make_model = tokenizer_and_model(cfg, train_rows, eval_rows, len(labels))
  names = [TOPIC_CLASSES[label] for label in labels] if cfg.topics else labels
  train_data = encode(train_rows, tok, cfg.seq_len, label_ids)
  eval_data = encode(eval_rows, tok, cfg.seq_len, label_ids)
  majority = np.bincount(eval_data["labels"]).max() / len(eval_rows)
  print(f"{len(train_rows)} train / {len(eval_rows)} eval examples, {len(labels)} classes "
        f"(majority-class accuracy {majority:.3f})")
  return training.Task(name=cfg.name, make_model=make_model, loss_fn=classification_loss,
                       train_data=train_data, eval_data=eval_data, head=("classifier",),
                       from_scratch=cfg.model is None and not cfg.pretrain_steps, tokenizer=tok,
                       labels=names)


# ---------------------------------------------------------------------------------------------
# Data: labelled rows (the manual's paragraphs, SuperGLUE, or files) and their encoding.


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
  hint = "each record: 'label' and 'text' (or 'premise' and 'hypothesis')"
  for i, r in enumerate(rows):
    if "label" not in r or not ("text" in r or ("premise" in r and "hypothesis" in r)):
      raise errors.UsageError(f"{what}: record {i} needs 'label' and 'text' (or 'premise' and "
                              "'hypothesis')")
    fields = ({"text": (str,)} if "text" in r else {"premise": (str,), "hypothesis": (str,)})
    data.check_record(i, r, what, {**fields, "label": (str, int)}, hint)


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


# ---------------------------------------------------------------------------------------------
# Loss and model.


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


def tokenizer_and_model(cfg: Config, train_rows: Sequence[dict], eval_rows: Sequence[dict],
                        num_labels: int):
  """``(tokenizer, make_model)``: ``--model``'s checkpoint, or a BPE trained on the training texts
  and a random-init RoBERTa (pretrained first with ``--pretrain-steps``), with a new
  ``num_labels``-way classification head."""
  from examples.models import roberta

  if cfg.model:
    return pretraining.checkpoint_model(cfg, "roberta", roberta.Roberta, num_labels=num_labels)
  text_of = lambda r: r.get("text") or f"{r['premise']} {r['hypothesis']}"
  texts = [text_of(r) for r in train_rows]
  if cfg.pretrain_steps:
    # The manual's paragraphs for the offline task (other data: its training texts), never a
    # held-out example's text.
    held_out = {text_of(r) for r in eval_rows}
    corpus = data.manual_paragraphs(indented=True) if cfg.topics else texts
    pretrain_texts = [t for t in corpus if t not in held_out]
    texts = texts + pretrain_texts
  tok = data.bpe_tokenizer(texts, rundir.output_dir(cfg) / "tokenizer.json",
                           vocab_size=cfg.vocab_size, special=SPECIAL, bos="<s>", eos="</s>",
                           pad="<pad>", single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                           unk_token="<unk>", mask_token="<mask>", keep=cfg.resume)
  model_cfg = roberta.RobertaConfig(
      vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
      max_position_embeddings=cfg.seq_len + tok.pad_id + 1, pad_token_id=tok.pad_id,
      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, num_labels=num_labels,
      **cfg.model_options())
  if not cfg.pretrain_steps:
    return tok, functools.partial(random_roberta, model_cfg, cfg.seed)
  make_mlm_model = functools.partial(random_roberta, model_cfg, cfg.seed, mlm=True)
  pretrained = pretraining.PretrainedModel(
      "roberta-mlm", cfg, model_cfg, tok, pretrain_texts, make_mlm_model,
      functools.partial(pretrain_task, cfg, tok, pretrain_texts, make_mlm_model))
  return tok, functools.partial(with_classifier, pretrained, model_cfg, cfg.seed)


def random_roberta(model_cfg, seed: int, mlm: bool = False):
  """A random-init RoBERTa; with ``mlm``, its classifier replaced by :func:`mlm_head`."""
  from flax import nnx

  from examples.models import roberta

  model = roberta.Roberta(model_cfg, rngs=nnx.Rngs(seed))
  if mlm:
    model.classifier = mlm_head(model_cfg, nnx.Rngs(seed + 1))
  return model


def with_classifier(make_model, model_cfg, seed: int):
  """``make_model()``'s encoder with a new classification head (in place of the MLM head)."""
  from flax import nnx

  from examples.models import roberta

  model = make_model()
  model.classifier = roberta.ClassificationHead(model_cfg, rngs=nnx.Rngs(seed))
  return model


# ---------------------------------------------------------------------------------------------
# The --pretrain-steps stage: masked language modelling.


MLM_PROB = 0.15  # fraction of the tokens masked for masked language modelling (BERT's, RoBERTa's)
MLM_COPIES = 4  # each pretraining text appears with this many different maskings


def mlm_head(model_cfg, rngs):
  """RoBERTa's masked-LM head (dense, GELU, LayerNorm, vocabulary projection) on every token.

  Put in place of the classifier for pretraining (``Roberta.__call__`` then returns token
  logits ``(batch, seq, vocab)``); the decoder is a separate matrix (HF ties it to the word
  embeddings, which matters little here: the head is dropped before fine-tuning).
  """
  import jax
  from flax import nnx

  from examples.models import roberta

  class MaskedLMHead(nnx.Module):

    def __init__(self):
      self.dense = roberta._linear(model_cfg, model_cfg.hidden_size, model_cfg.hidden_size, rngs)
      self.layer_norm = roberta._layer_norm(model_cfg, rngs)
      self.decoder = roberta._linear(model_cfg, model_cfg.hidden_size, model_cfg.vocab_size, rngs)

    def __call__(self, x):
      return self.decoder(self.layer_norm(jax.nn.gelu(self.dense(x), approximate=False)))

  return MaskedLMHead()


def mlm_data(texts: Sequence[str], tok: data.Tokenizer, seq_len: int, seed: int) -> dict:
  """``<s> text </s>`` rows, each in ``MLM_COPIES`` maskings (:func:`examples.data.mask_tokens`),
  shuffled: ``input_ids``, ``attention_mask``, ``mlm_targets`` (-1: no loss), ``weight``."""
  import numpy as np

  ids = encode([{"text": t, "label": 0} for t in texts], tok, seq_len, {0: 0})["input_ids"]
  maskable = (ids != tok.pad_id) & (ids != tok.bos_id) & (ids != tok.eos_id)
  rng = np.random.default_rng([seed, 1])
  rows = [data.mask_tokens(ids, rng=rng, mask_id=SPECIAL.index("<mask>"), maskable=maskable,
                           vocab=(len(SPECIAL), tok.vocab_size), prob=MLM_PROB)
          for _ in range(MLM_COPIES)]
  inputs = np.concatenate([r[0] for r in rows])
  order = rng.permutation(len(inputs))
  inputs = inputs[order]
  return {"input_ids": inputs, "attention_mask": (inputs != tok.pad_id).astype(np.int32),
          "mlm_targets": np.concatenate([r[1] for r in rows])[order],
          "weight": np.ones(len(inputs), np.float32)}


def mlm_loss(model, batch: dict):
  """Mean cross-entropy of the masked tokens (the model's classifier is the MLM head)."""
  import jax.numpy as jnp
  import optax

  logits = model(batch["input_ids"], batch["attention_mask"])
  targets = batch["mlm_targets"]
  w = (targets >= 0) * batch["weight"][:, None]
  safe = jnp.maximum(targets, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  correct = jnp.sum((jnp.argmax(logits, -1) == safe) * w)
  total, count = jnp.sum(nll * w), jnp.sum(w)
  return total / jnp.maximum(count, 1.0), {"nll_sum": total, "count": count, "correct": correct}


def pretrain_task(cfg: Config, tok: data.Tokenizer, texts: Sequence[str], make_model, keep):
  """The ``--pretrain-steps`` task: masked language modelling on ``texts`` (a twentieth held out
  for the pretraining's own eval loss); ``keep(model)`` receives the pretrained model."""
  import numpy as np

  from examples import training

  order = np.random.default_rng(cfg.seed).permutation(len(texts))
  held = max(1, len(texts) // 20)
  held_rows = mlm_data([texts[i] for i in order[:held]], tok, cfg.seq_len, cfg.seed)
  rows = mlm_data([texts[i] for i in order[held:]], tok, cfg.seq_len, cfg.seed)
  task = training.Task(
      name=f"{cfg.name}-pretrain", loss_fn=mlm_loss, make_model=make_model,
      train_data=rows, eval_data=held_rows, after_training=lambda model, _: keep(model))
  print(f"pretraining with masked language modelling on {len(texts) - held} paragraphs "
        f"({cfg.pretrain_steps} AdamW steps)")
  return task


# ---------------------------------------------------------------------------------------------
# The command line.


def describe(cfg: Config) -> str:
  """The model and data, for the first line the script prints."""
  model = (f"the RoBERTa checkpoint {cfg.model}" if cfg.model else
           f"a random-init RoBERTa ({cfg.num_layers} layers, width {cfg.hidden_size})")
  if cfg.pretrain_steps:
    model += f" pretrained for {cfg.pretrain_steps} masked-LM steps"
  if cfg.train:
    task = cfg.train
  elif cfg.task == "topics":
    task = "classifying paragraphs of the Python reference manual"
  else:
    task = f"SuperGLUE {cfg.task}"
  return f"{model} on {task}"


@errors.main_guard
def main(argv: Sequence[str] | None = None):
  cfg = cli.parse_config(Config, argv, __doc__)
  return cli.launch(cfg, describe(cfg), build_task)


if __name__ == "__main__":
  errors.run_script(main)
