"""Reading GGUF files (llama.cpp's format): metadata, tensors dequantized to float32, the BPE tokenizer.

Needs the ``ifjax[llm]`` extra (``gguf``, ``tokenizers``); both are imported lazily. Tensors come back in
NumPy (row-major) order, the reverse of GGUF's ``ne`` order: a linear layer's weight is ``(out, in)``, as in
PyTorch. llama.cpp's HF -> GGUF conversion permutes the rows of ``attn_q`` / ``attn_k`` so that rotary
embeddings rotate *adjacent* pairs (0, 1), (2, 3), ...; :mod:`ifjax.models._llama` keeps that layout.
For SmolLM2-135M, ``read_gguf(path).metadata["llama.block_count"]`` is 30.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ifjax._errors import IfjaxError

__all__ = ["GGUFError", "GGUFFile", "gguf_tokenizer", "read_gguf"]

_EXTRA = 'pip install "ifjax[llm]"'


class GGUFError(IfjaxError, ValueError):
  """A GGUF file that cannot be read (missing, truncated, corrupt) or describes a model ifjax does not load."""


class GGUFFile(NamedTuple):
  """A read GGUF file: its path, metadata ``{key: value}`` (strings, numbers, lists) and float32 tensors
  ``{name: array}`` in NumPy order (reversed ``ne``)."""
  path: Path
  metadata: dict[str, Any]
  tensors: dict[str, np.ndarray]


def _import_gguf():
  try:
    import gguf
    import gguf.quants
  except ImportError as e:
    raise ImportError(f"reading GGUF files needs the 'gguf' package: {_EXTRA}") from e
  return gguf


# metadata of files read before, by (path, size, mtime): parsing SmolLM2's 98k tokenizer strings takes seconds
_METADATA: dict[tuple[str, int, int], dict[str, Any]] = {}


def read_gguf(path: str | os.PathLike, tensors: bool = True) -> GGUFFile:
  """The metadata and (with ``tensors``) the float32 tensors of GGUF file ``path``.

  Raises :class:`GGUFError` naming the file if it is missing, not a GGUF file, or truncated.
  """
  gguf = _import_gguf()
  path = Path(path)
  if not path.is_file():
    raise GGUFError(f"{path}: no such GGUF file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
  stat = path.stat()
  size, cache_key = stat.st_size, (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
  if not tensors and cache_key in _METADATA:
    return GGUFFile(path, dict(_METADATA[cache_key]), {})
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OverflowError, EOFError) as e:
    raise GGUFError(f"{path}: a truncated or corrupt GGUF file ({size} bytes; the reader failed with "
                    f"{type(e).__name__}: {e})") from None
  metadata = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    try:
      metadata[key] = field.contents()
    except (ValueError, IndexError) as e:
      raise GGUFError(f"{path}: metadata {key!r} cannot be read ({e})") from None
  if len(_METADATA) >= 4:
    _METADATA.pop(next(iter(_METADATA)))
  _METADATA[cache_key] = dict(metadata)
  arrays: dict[str, np.ndarray] = {}
  if tensors:
    for t in reader.tensors:
      end = int(t.data_offset) + int(t.n_bytes)
      if end > size:
        raise GGUFError(f"{path}: truncated: tensor {t.name!r} ends at byte {end}, the file has {size}")
      try:
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
      except (ValueError, NotImplementedError) as e:
        raise GGUFError(f"{path}: tensor {t.name!r} of type {t.tensor_type.name} cannot be dequantized ({e})") \
            from None
      shape = tuple(int(n) for n in reversed(t.shape))
      arrays[t.name] = np.ascontiguousarray(np.asarray(a, np.float32).reshape(shape))
  return GGUFFile(path, metadata, arrays)


def gguf_tokenizer(metadata: dict[str, Any], path: str | os.PathLike = "<gguf>"):
  """The ``tokenizers.Tokenizer`` of a GGUF file's ``tokenizer.ggml.*`` metadata (model ``gpt2``: byte-level
  BPE from ``tokens`` and ``merges``; digits split one by one, as SmolLM2's tokenizer does; no BOS added)."""
  try:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  except ImportError as e:
    raise ImportError(f"the GGUF tokenizer needs the 'tokenizers' package: {_EXTRA}") from e
  kind = metadata.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
  try:
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
  except KeyError as e:
    raise GGUFError(f"{path}: the tokenizer metadata lacks {e.args[0]!r}") from None
  types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise GGUFError(f"{path}: tokenizer.ggml.tokens has duplicate tokens")
  unknown = next((m for m in merges if len(m) != 2 or m[0] not in vocab or m[1] not in vocab), None)
  if unknown is not None:
    raise GGUFError(f"{path}: tokenizer.ggml.merges has {' '.join(unknown)!r}, which merges tokens not in "
                    "tokenizer.ggml.tokens")
  tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence([  # type: ignore[assignment]
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  tok.decoder = decoders.ByteLevel()  # type: ignore[assignment]
  special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]  # CONTROL
  if special:
    tok.add_special_tokens(special)
  return tok
