"""Llama (decoder-only causal LM) in Flax NNX, loading and saving Hugging Face checkpoints.

RMSNorm, rotary position embeddings (default and Llama 3 frequency scaling), grouped-query
attention, SwiGLU MLP, tied or untied ``lm_head``. Parameter paths follow the HF names without
the ``model.`` prefix, e.g. ``layers.3.mlp.gate_proj.kernel``: one ``layers.N`` subtree per
decoder layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from examples.models import base


@dataclasses.dataclass
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: as many as attention heads (no grouping)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None  # HF rope parameters of a "llama3" rope, else None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None
  # Run-time options, not part of the checkpoint.
  param_dtype: str = "float32"  # dtype the parameters are stored in
  dtype: str = "float32"  # dtype the activations are computed in
  remat: bool = False  # recompute each layer's activations in the backward pass
  scan_layers: bool = False  # one stacked layer scanned with nnx.scan instead of a python list

  def __post_init__(self):
    if self.num_key_value_heads is None:
      self.num_key_value_heads = self.num_attention_heads
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
      self.head_dim = self.hidden_size // self.num_attention_heads
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if self.head_dim % 2:
      raise ValueError("head_dim must be even for rotary embeddings")
    base.to_dtype(self.param_dtype)
    base.to_dtype(self.dtype)

  @classmethod
  def from_hf(cls, hf_config: Any, **options) -> LlamaConfig:
    rope = dict(getattr(hf_config, "rope_parameters", None) or
                getattr(hf_config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
      raise ValueError(f"rope type {rope_type!r} is not supported (only default and llama3)")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    eos = hf_config.eos_token_id
    return cls(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=getattr(hf_config, "num_key_value_heads", None),
        head_dim=getattr(hf_config, "head_dim", None),
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(theta),
        rope_scaling=rope if rope_type == "llama3" else None,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=hf_config.pad_token_id,
        **options,
    )

  def to_hf(self):
    from transformers import LlamaConfig as HFLlamaConfig

    rope = dict(self.rope_scaling or {"rope_type": "default"})
    rope["rope_theta"] = self.rope_theta
    return HFLlamaConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
        head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
        mlp_bias=self.mlp_bias, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        pad_token_id=self.pad_token_id, dtype=self.param_dtype,
        architectures=["LlamaForCausalLM"])


def rope_frequencies(cfg: LlamaConfig) -> jax.Array:
  """Inverse frequencies ``(head_dim // 2,)``, with Llama 3's long-context rescaling if set."""
  d = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if cfg.rope_scaling is None:
    return inv_freq
  s = cfg.rope_scaling
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_len = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  out = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
  return jnp.where(is_medium, smoothed, out)


def apply_rope(x, cos, sin):
  """HF's non-interleaved rotation: the two halves of ``head_dim`` form the complex pairs."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                        cfg.num_key_value_heads, cfg.head_dim)
    linear = functools.partial(_linear, cfg, use_bias=cfg.attention_bias, rngs=rngs)
    self.q_proj = linear(cfg.hidden_size, self.num_heads * self.head_dim)
    self.k_proj = linear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
    self.v_proj = linear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
    self.o_proj = linear(self.num_heads * self.head_dim, cfg.hidden_size)

  def __call__(self, x, cos, sin, mask):
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return self.o_proj(base.dot_product_attention(q, k, v, mask))


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    linear = functools.partial(_linear, cfg, use_bias=cfg.mlp_bias, rngs=rngs)
    self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = _rms_norm(cfg, rngs)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = _rms_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, mask):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
  """``LlamaForCausalLM``: token ids ``(batch, seq)`` → float32 logits ``(batch, seq, vocab)``."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=base.to_dtype(cfg.dtype),
                                  param_dtype=base.to_dtype(cfg.param_dtype),
                                  embedding_init=base.init_normal(), rngs=rngs)
    self.layers = base.make_layers(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs,
                                   cfg.scan_layers)
    self.norm = _rms_norm(cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, positions=None):
    """``attention_mask``: 1 for real tokens, 0 for padding (keys that no query may attend to)."""
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, :]
    freqs = positions[..., None].astype(jnp.float32) * rope_frequencies(self.config)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    dtype = base.to_dtype(self.config.dtype)
    cos, sin = jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)
    x = self.embed_tokens(input_ids)
    x = base.apply_layers(self.layers, x, cos, sin, mask, scan=self.config.scan_layers,
                          remat=self.config.remat)
    x = self.norm(x)
    logits = self.embed_tokens.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
    return logits.astype(jnp.float32)

  # -- Hugging Face checkpoints ------------------------------------------------------------------

  def weight_map(self) -> base.WeightMap:
    cfg = self.config
    wm = [(("embed_tokens", "embedding"), "model.embed_tokens.weight", False),
          (("norm", "scale"), "model.norm.weight", False)]
    if not cfg.tie_word_embeddings:
      wm.append((("lm_head", "kernel"), "lm_head.weight", True))
    linears = [("self_attn", p, cfg.attention_bias)
               for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [("mlp", p, cfg.mlp_bias) for p in ("gate_proj", "up_proj", "down_proj")]
    for i in range(cfg.num_hidden_layers):
      for mod, proj, bias in linears:
        name = f"model.layers.{i}.{mod}.{proj}"
        wm.append((("layers", i, mod, proj, "kernel"), name + ".weight", True))
        if bias:
          wm.append((("layers", i, mod, proj, "bias"), name + ".bias", False))
      for norm in ("input_layernorm", "post_attention_layernorm"):
        wm.append((("layers", i, norm, "scale"), f"model.layers.{i}.{norm}.weight", False))
    return wm

  @classmethod
  def load_pretrained(cls, path, *, seed: int = 0, **options) -> Llama:
    """Reads a local HF Llama checkpoint (``config.json`` + ``*.safetensors``)."""
    cfg = LlamaConfig.from_hf(base.read_hf_config(path, ["llama"]), **options)
    tensors = base.read_safetensors(path)
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed)))  # every weight is loaded below
    base.load_weights(model, tensors, model.weight_map(), base_prefix="model.",
                      num_layers=cfg.num_hidden_layers, scan=cfg.scan_layers)
    return model

  def save_pretrained(self, path) -> None:
    """Writes ``config.json`` + ``model.safetensors`` that ``LlamaForCausalLM`` loads."""
    cfg = self.config
    tensors = base.export_weights(self, self.weight_map(), num_layers=cfg.num_hidden_layers,
                                  scan=cfg.scan_layers)
    base.write_hf_checkpoint(path, cfg.to_hf(), tensors)


def _linear(cfg: LlamaConfig, din: int, dout: int, *, use_bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=base.to_dtype(cfg.dtype),
                    param_dtype=base.to_dtype(cfg.param_dtype), kernel_init=base.init_normal(),
                    rngs=rngs)


def _rms_norm(cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, dtype=base.to_dtype(cfg.dtype),
                     param_dtype=base.to_dtype(cfg.param_dtype), rngs=rngs)


def generate(model: Llama, prompt_ids, max_new_tokens: int, *, eos_id: int | None = None):
  """Greedy decoding by recomputing the whole (fixed-size) window each step: one compilation.

  Args:
    model: the model.
    prompt_ids: a 1-D sequence of token ids.
    max_new_tokens: how many tokens to append at most.
    eos_id: stop at this token.

  Returns:
    The list of generated token ids (without the prompt).
  """
  prompt = list(prompt_ids)
  total = len(prompt) + max_new_tokens
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_token(state, tokens, pos):
    logits = nnx.merge(graphdef, state)(tokens[None])[0]
    return jnp.argmax(logits[pos - 1])

  tokens = jnp.zeros((total,), jnp.int32).at[:len(prompt)].set(jnp.asarray(prompt, jnp.int32))
  out = []
  for pos in range(len(prompt), total):
    tok = int(next_token(state, tokens, pos))
    if eos_id is not None and tok == eos_id:
      break
    out.append(tok)
    tokens = tokens.at[pos].set(tok)
  return out
