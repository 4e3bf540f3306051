"""Data and tokenizers: reading records, tokenizers (trained here or a checkpoint's), batching.

What is specific to one task (its prompt format, its encoding, its default data) lives in that
task's script; this module holds what both need.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from examples.errors import UsageError

if TYPE_CHECKING:
  import numpy as np

# Files a Hugging Face tokenizer is loaded from; a directory needs one of these sets.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"),
                   ("vocab.txt",))


class Tokenizer:
  """The few things the examples need from a tokenizer (``tokenizers`` or transformers).

  Args:
    tok: a ``tokenizers.Tokenizer`` or a transformers tokenizer.
    bos, eos, pad: ids of the special tokens (``bos``/``eos`` may be None).
    special_tokens: names of the special tokens for transformers (``bos_token="<s>"``...), used
      by :meth:`save_pretrained` for a ``tokenizers.Tokenizer``.
  """

  def __init__(self, tok: Any, *, bos: int | None, eos: int | None, pad: int,
               special_tokens: dict[str, str] | None = None):
    self._tok, self.bos_id, self.eos_id, self.pad_id = tok, bos, eos, pad
    self.special_tokens = dict(special_tokens or {})
    self._raw = hasattr(tok, "get_vocab_size")  # a tokenizers.Tokenizer, not transformers'
    self.vocab_size = tok.get_vocab_size() if self._raw else len(tok)

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without special tokens."""
    if self._raw:
      return self._tok.encode(text, add_special_tokens=False).ids
    return self._tok.encode(text, add_special_tokens=False)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids))

  def save_pretrained(self, path: str | pathlib.Path) -> None:
    """Writes the tokenizer files that ``transformers.AutoTokenizer`` loads."""
    if self._raw:
      from transformers import PreTrainedTokenizerFast

      tok = PreTrainedTokenizerFast(tokenizer_object=self._tok, **self.special_tokens)
    else:
      tok = self._tok
    tok.save_pretrained(str(path))


def bpe_tokenizer(texts: Sequence[str], path: pathlib.Path, *, vocab_size: int,
                  special: Sequence[str], bos: str, eos: str, pad: str,
                  single: str | None = None, pair: str | None = None, keep: bool = False,
                  **special_tokens: str) -> Tokenizer:
  """A byte-level BPE trained on ``texts`` in seconds, cached at ``path`` (``tokenizer.json``).

  The cache is reused only when it was trained on the same texts with the same options: its
  provenance (a hash of the texts, the vocabulary size and the options) is recorded next to it
  (``tokenizer.provenance.json``); otherwise it is trained again, and that is printed.

  Args:
    texts: the training texts.
    path: the cache file.
    vocab_size: vocabulary size, ``special`` included.
    special: the special tokens (they get the first ids, in this order).
    bos, eos, pad: which of them are the begin, end and padding tokens.
    single, pair: ``tokenizers`` templates of the special tokens that transformers adds around one
      text or a pair (e.g. ``"<s> $A </s>"``) once exported; :meth:`Tokenizer.encode` adds none.
    keep: the cache must be reused (a resumed run's checkpoint was trained with it): a cache
      that does not match is an error instead of being trained again.
    **special_tokens: further named special tokens for transformers (``unk_token="<unk>"``).

  Returns:
    The tokenizer.
  """
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  provenance = tokenizer_provenance(texts, vocab_size=vocab_size, special=list(special), bos=bos,
                                    eos=eos, pad=pad, single=single, pair=pair, **special_tokens)
  record = path.with_name(path.stem + ".provenance.json")
  stale = _stale_reason(path, record, provenance)
  if stale and keep:
    raise UsageError(f"{path} {stale}, but the run's checkpoint was trained with it; resume with "
                     "the run's data and options, or start over with --overwrite")
  if not stale:
    tok = HFTokenizer.from_file(str(path))
  else:
    if path.exists():
      print(f"training a new tokenizer: {path} {stale}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if single:
      tok.post_processor = processors.TemplateProcessing(
          single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in special])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    record.write_text(json.dumps(provenance, indent=1) + "\n")
  names = {"bos_token": bos, "eos_token": eos, "pad_token": pad, **special_tokens}
  return Tokenizer(tok, bos=tok.token_to_id(bos), eos=tok.token_to_id(eos), pad=tok.token_to_id(pad),
                   special_tokens=names)


def tokenizer_provenance(texts: Sequence[str], **options) -> dict:
  """What a trained tokenizer is made of: the SHA-256 of its training texts (in order, each one
  delimited), their number, and its options (vocabulary size, special tokens, templates)."""
  digest = hashlib.sha256()
  for text in texts:
    encoded = text.encode("utf-8")
    digest.update(len(encoded).to_bytes(8, "little"))
    digest.update(encoded)
  return {"texts_sha256": digest.hexdigest(), "texts": len(texts), **options}


def _stale_reason(path: pathlib.Path, record: pathlib.Path, provenance: dict) -> str | None:
  """Why the cached tokenizer at ``path`` cannot be reused (None: it can)."""
  if not path.is_file():
    return "does not exist"
  try:
    old = json.loads(record.read_text())
  except (OSError, ValueError):
    return f"has no provenance record ({record.name})"
  if old.get("texts_sha256") != provenance["texts_sha256"]:
    return (f"was trained on other texts ({old.get('texts')} of them, now "
            f"{provenance['texts']})")
  changed = [k for k in provenance if k not in ("texts_sha256", "texts") and old.get(k) != provenance[k]]
  if changed:
    return "was trained with other options (" + ", ".join(
        f"{k} {old.get(k)} -> {provenance[k]}" for k in changed) + ")"
  return None


def pretrained_tokenizer(model_dir: str) -> Tokenizer:
  """The tokenizer of a Hugging Face checkpoint directory, with a one-line error if it has none."""
  directory = pathlib.Path(model_dir)
  if not any(all((directory / f).is_file() for f in files) for files in TOKENIZER_FILES):
    names = ", ".join(" + ".join(files) for files in TOKENIZER_FILES)
    raise UsageError(f"{model_dir} has no tokenizer (none of {names}); copy the tokenizer files "
                     "of the checkpoint into it")
  from transformers import AutoTokenizer

  try:
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  except Exception as e:  # transformers raises several kinds; all of the message matters
    raise UsageError(f"cannot load a tokenizer from {model_dir}: {' '.join(str(e).split())}") from None
  pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
  return Tokenizer(tok, bos=tok.bos_token_id, eos=tok.eos_token_id, pad=pad)


def read_records(path: str, what: str) -> list[dict]:
  """Rows of a JSON list or JSONL file, with a one-line error for a missing or malformed file."""
  p = pathlib.Path(path)
  if p.is_dir():
    raise UsageError(f"{what} {path} is a directory; give a JSON or JSONL file")
  if not p.is_file():
    raise UsageError(f"{what} file {path} not found; give a JSON or JSONL file")
  text = p.read_text(encoding="utf-8")
  try:
    if text.lstrip().startswith("["):
      rows = json.loads(text)
    else:
      rows = [json.loads(line) for line in text.splitlines() if line.strip()]
  except json.JSONDecodeError as e:
    raise UsageError(f"{what} file {path} is not valid JSON/JSONL ({e.msg} at line {e.lineno}); "
                     "give a JSON list or one JSON object per line") from None
  if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
    raise UsageError(f"{what} file {path} must hold a non-empty list of JSON objects")
  return rows


def check_fields(rows: Sequence[dict], what: str, fields: dict[str, tuple[type, ...]],
                 hint: str) -> None:
  """One line for the first record whose field (name -> allowed types) is missing or of another
  type, e.g. an ``output`` that is null or a number where text is expected."""
  for i, r in enumerate(rows):
    check_record(i, r, what, fields, hint)


def check_record(index: int, record: dict, what: str, fields: dict[str, tuple[type, ...]],
                 hint: str) -> None:
  """:func:`check_fields` for one record (``index``: its place in the file)."""
  kinds = {str: "text", int: "an integer", type(None): "null"}
  for name, types in fields.items():
    if name not in record:
      if type(None) in types:
        continue
      raise UsageError(f"{what}: record {index} has no {name!r} ({hint})")
    value = record[name]
    if not isinstance(value, types):
      given = "null" if value is None else type(value).__name__
      allowed = " or ".join(kinds.get(t, t.__name__) for t in types if t is not type(None))
      raise UsageError(f"{what}: record {index}'s {name!r} is {given}, not {allowed} ({hint})")


def load_hub_dataset(name: str, *args, **kwargs):
  """``datasets.load_dataset``, imported lazily with a clear message when it is unavailable."""
  try:
    import datasets
  except ImportError:
    raise UsageError(f"{name!r} is not a local file, and loading it from the Hugging Face hub "
                     "needs `pip install datasets`") from None
  try:
    return datasets.load_dataset(name, *args, **kwargs)
  except Exception as e:  # offline, unknown name, ...: one line is enough
    raise UsageError(f"cannot load dataset {name!r} from the hub: "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def manual_paragraphs(*, indented: bool = False) -> list[str]:
  """The paragraphs of the Python reference manual that ships with Python (``pydoc_data``), in
  topic order, whitespace collapsed, grammar rules (``::=``) left out: the offline pretraining
  corpus.

  Args:
    indented: also the indented paragraphs (code examples), each kept when it is longer than 40
      characters once collapsed (RoBERTa's masked-LM corpus); without it, prose only, each kept
      when its text in the manual is longer than 40 characters (Llama's language-model corpus).
  """
  from pydoc_data.topics import topics

  out = []
  for key in sorted(topics):
    for p in re.split(r"\n\s*\n", topics[key]):
      text = " ".join(p.split())
      if indented:
        keep = len(text) > 40 and "::=" not in text
      else:
        keep = bool(p.strip()) and not p.startswith(" ") and "::=" not in p and len(p) > 40
      if keep:
        out.append(text)
  return out


def pad_rows(data: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Pads every array to a multiple of ``multiple`` rows; padded rows get ``weight`` 0."""
  import numpy as np

  n = len(next(iter(data.values())))
  extra = -n % multiple
  out = {k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in data.items()}
  out["weight"] = np.concatenate([np.ones(n, np.float32), np.zeros(extra, np.float32)])
  return out


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Rows of the batch at ``step``: a pure function of (seed, step), so resuming is exact."""
  import numpy as np

  per_epoch = n // batch_size
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[i * batch_size:(i + 1) * batch_size]


def mask_tokens(ids: np.ndarray, *, rng: np.random.Generator, mask_id: int, maskable: np.ndarray,
                vocab: tuple[int, int], prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
  """BERT's masking for masked language modelling: ``(inputs, targets)`` of ``ids``.

  Each ``maskable`` token (real text, not special or padding) is chosen with probability ``prob``
  (at least one per row that has any); a chosen token becomes ``mask_id`` 80% of the time, a
  random id in ``range(*vocab)`` 10%, and stays itself 10%. ``targets`` is the original id at the
  chosen positions and -1 elsewhere (no loss).
  """
  import numpy as np

  chosen = (rng.random(ids.shape) < prob) & maskable
  # A row without a chosen token would add nothing: choose one of its maskable tokens instead.
  empty = ~chosen.any(axis=1) & maskable.any(axis=1)
  for i in np.flatnonzero(empty):
    chosen[i, rng.choice(np.flatnonzero(maskable[i]))] = True
  action = rng.random(ids.shape)
  inputs = np.where(chosen & (action < 0.8), mask_id, ids)
  random_ids = rng.integers(vocab[0], vocab[1], ids.shape)
  inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
  targets = np.where(chosen, ids, -1)
  return inputs.astype(ids.dtype), targets.astype(np.int32)
