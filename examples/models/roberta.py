"""RoBERTa with a sequence-classification head in Flax NNX, loading and saving HF checkpoints.

Learned absolute positions (numbered from ``pad_token_id + 1`` as in fairseq/HF, padding keeps
position ``pad_token_id``), post-LayerNorm encoder layers, and HF's ``RobertaClassificationHead``
(dense → tanh → out_proj on the ``<s>`` token). Parameter paths look like
``layers.3.attention.query.kernel``.
Dropout is not modelled (the example fine-tunes without it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from examples.models import base

_ACTIVATIONS = {"gelu": functools.partial(jax.nn.gelu, approximate=False),
                "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
                "relu": jax.nn.relu}


@dataclasses.dataclass
class RobertaConfig:
  vocab_size: int = 50265
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 514
  type_vocab_size: int = 1
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 0
  eos_token_id: int = 2
  num_labels: int = 2
  # Run-time options, not part of the checkpoint.
  param_dtype: str = "float32"  # dtype the parameters are stored in
  dtype: str = "float32"  # dtype the activations are computed in
  remat: bool = False  # recompute each layer's activations in the backward pass
  scan_layers: bool = False  # one stacked layer scanned with nnx.scan instead of a python list

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError("hidden_size must be a multiple of num_attention_heads")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported")
    base.to_dtype(self.param_dtype)
    base.to_dtype(self.dtype)

  @classmethod
  def from_hf(cls, hf_config: Any, **options) -> RobertaConfig:
    fields = [f.name for f in dataclasses.fields(cls)
              if f.name not in ("param_dtype", "dtype", "remat", "scan_layers")]
    return cls(**{k: getattr(hf_config, k) for k in fields}, **options)

  def to_hf(self):
    from transformers import RobertaConfig as HFRobertaConfig

    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name not in ("param_dtype", "dtype", "remat", "scan_layers")}
    return HFRobertaConfig(**fields, dtype=self.param_dtype,
                           architectures=["RobertaForSequenceClassification"])


class SelfAttention(nnx.Module):

  def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_attention_heads
    h = cfg.hidden_size
    self.query, self.key, self.value = (_linear(cfg, h, h, rngs) for _ in range(3))
    self.out_proj = _linear(cfg, h, h, rngs)

  def __call__(self, x, mask):
    b, t, h = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, h // self.num_heads)
    out = base.dot_product_attention(split(self.query(x)), split(self.key(x)),
                                     split(self.value(x)), mask)
    return self.out_proj(out)


class EncoderLayer(nnx.Module):

  def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
    self.attention = SelfAttention(cfg, rngs=rngs)
    self.attention_norm = _layer_norm(cfg, rngs)
    self.intermediate = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
    self.output = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)
    self.output_norm = _layer_norm(cfg, rngs)
    self.act = _ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x, mask):
    x = self.attention_norm(x + self.attention(x, mask))
    return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class Embeddings(nnx.Module):

  def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
    embed = functools.partial(nnx.Embed, features=cfg.hidden_size, dtype=base.to_dtype(cfg.dtype),
                              param_dtype=base.to_dtype(cfg.param_dtype),
                              embedding_init=base.init_normal(), rngs=rngs)
    self.word_embeddings = embed(cfg.vocab_size)
    self.position_embeddings = embed(cfg.max_position_embeddings)
    self.token_type_embeddings = embed(cfg.type_vocab_size)
    self.layer_norm = _layer_norm(cfg, rngs)
    self.pad_token_id = cfg.pad_token_id

  def __call__(self, input_ids, token_type_ids=None):
    not_pad = (input_ids != self.pad_token_id).astype(jnp.int32)
    positions = jnp.cumsum(not_pad, axis=1) * not_pad + self.pad_token_id
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions) +
         self.token_type_embeddings(token_type_ids))
    return self.layer_norm(x)


class ClassificationHead(nnx.Module):

  def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
    self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, rngs)
    self.out_proj = _linear(cfg, cfg.hidden_size, cfg.num_labels, rngs)

  def __call__(self, x):
    return self.out_proj(jnp.tanh(self.dense(x[:, 0])))


class Roberta(nnx.Module):
  """``RobertaForSequenceClassification``: ids ``(batch, seq)`` → logits ``(batch, labels)``."""

  def __init__(self, cfg: RobertaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = base.make_layers(lambda r: EncoderLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs,
                                   cfg.scan_layers)
    self.classifier = ClassificationHead(cfg, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    """``attention_mask``: 1 for real tokens, 0 for padding; by default derived from pad ids."""
    if attention_mask is None:
      attention_mask = input_ids != self.config.pad_token_id
    mask = jnp.broadcast_to(attention_mask.astype(bool)[:, None, :], (*input_ids.shape,
                                                                       input_ids.shape[1]))
    x = self.embeddings(input_ids, token_type_ids)
    x = base.apply_layers(self.layers, x, mask, scan=self.config.scan_layers,
                          remat=self.config.remat)
    return self.classifier(x).astype(jnp.float32)

  # -- Hugging Face checkpoints ------------------------------------------------------------------

  def weight_map(self) -> base.WeightMap:
    def linear(path, name):
      return [(path + ("kernel",), name + ".weight", True),
              (path + ("bias",), name + ".bias", False)]

    def norm(path, name):
      return [(path + ("scale",), name + ".weight", False),
              (path + ("bias",), name + ".bias", False)]

    e = "roberta.embeddings."
    wm = [((("embeddings", n, "embedding")), e + n + ".weight", False)
          for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    wm += norm(("embeddings", "layer_norm"), e + "LayerNorm")
    for i in range(self.config.num_hidden_layers):
      p, n = ("layers", i), f"roberta.encoder.layer.{i}."
      for proj in ("query", "key", "value"):
        wm += linear(p + ("attention", proj), n + "attention.self." + proj)
      wm += linear(p + ("attention", "out_proj"), n + "attention.output.dense")
      wm += norm(p + ("attention_norm",), n + "attention.output.LayerNorm")
      wm += linear(p + ("intermediate",), n + "intermediate.dense")
      wm += linear(p + ("output",), n + "output.dense")
      wm += norm(p + ("output_norm",), n + "output.LayerNorm")
    wm += linear(("classifier", "dense"), "classifier.dense")
    wm += linear(("classifier", "out_proj"), "classifier.out_proj")
    return wm

  @classmethod
  def load_pretrained(cls, path, *, seed: int = 0, num_labels: int | None = None,
                      **options) -> Roberta:
    """Reads a local HF RoBERTa checkpoint; the head is kept if it has ``num_labels`` outputs.

    A checkpoint without a classification head (``RobertaModel`` / ``RobertaForMaskedLM``), or one
    whose head has another number of labels, gets a freshly initialised head.
    """
    hf_config = base.read_hf_config(path, ["roberta"])
    cfg = RobertaConfig.from_hf(hf_config, **options)
    if num_labels is not None:
      cfg = dataclasses.replace(cfg, num_labels=num_labels)
    tensors = base.read_safetensors(path)
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed)))  # no random init to overwrite
    wm = model.weight_map()
    head = tensors.get("classifier.out_proj.weight")
    if head is None or head.shape[0] != cfg.num_labels:
      model.classifier = ClassificationHead(cfg, rngs=nnx.Rngs(seed))
      wm = [w for w in wm if w[0][0] != "classifier"]
    base.load_weights(model, tensors, wm, base_prefix="roberta.",
                      num_layers=cfg.num_hidden_layers, scan=cfg.scan_layers)
    return model

  def save_pretrained(self, path) -> None:
    """Writes ``config.json`` + ``model.safetensors`` for ``RobertaForSequenceClassification``."""
    cfg = self.config
    tensors = base.export_weights(self, self.weight_map(), num_layers=cfg.num_hidden_layers,
                                  scan=cfg.scan_layers)
    base.write_hf_checkpoint(path, cfg.to_hf(), tensors)


def _linear(cfg: RobertaConfig, din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, dtype=base.to_dtype(cfg.dtype),
                    param_dtype=base.to_dtype(cfg.param_dtype), kernel_init=base.init_normal(),
                    rngs=rngs)


def _layer_norm(cfg: RobertaConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=base.to_dtype(cfg.dtype),
                       param_dtype=base.to_dtype(cfg.param_dtype), rngs=rngs)
