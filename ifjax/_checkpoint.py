"""Read PyTorch checkpoints without torch, and load them into Flax variables.

:func:`read_torch` reads a ``.pt`` / ``.pth`` / ``.th`` file written by
``torch.save``, in the zip format (torch >= 1.6) or the legacy pickle sequence
(torch < 1.6, or ``_use_new_zipfile_serialization=False``). Tensors become NumPy
arrays. Unpickling is restricted to a whitelist of globals (containers, storage
types, tensor rebuild functions), so a checkpoint cannot run code.

:func:`state_dict` picks the flat ``{name: array}`` dict out of what was read,
and :func:`load_into` copies it into a Flax variables pytree by an explicit
``{flax path: (torch key, layout)}`` mapping::

  tensors = state_dict(read_torch("resnet20.th"))
  variables = load_into(variables, tensors, {"params/conv1/kernel": ("conv1.weight", "conv"), ...})
"""

from __future__ import annotations

import argparse
import collections
import contextvars
import io
import math
import os
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, cast

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ifjax._errors import IfjaxError
from ifjax._spec import flatten, unflatten

__all__ = ["CheckpointError", "CheckpointMismatchError", "load_into", "read_torch", "state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"
_LIST_LIMIT = 20  # problems listed per kind in a CheckpointMismatchError message
_MAX_EXPANSION = 2**26  # elements all overlapping (e.g. stride-0) tensors of one file may expand their storages to
# the elements built so far from overlapping tensors of the file being read (None outside read_torch)
_EXPANDED: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("ifjax_checkpoint_expanded", default=None)


class CheckpointError(IfjaxError, ValueError):
  """A file is not a readable PyTorch checkpoint, or holds objects ifjax refuses to build."""


class CheckpointMismatchError(CheckpointError):
  """Checkpoint tensors and Flax variables do not correspond; the message lists every problem.

  Attributes: ``unmapped`` (variable paths without a mapping entry), ``unknown``
  (mapping paths not in the variables), ``missing`` (torch keys the mapping
  names but the checkpoint lacks), ``unexpected`` (checkpoint keys the mapping
  does not use) and ``mismatched`` (``(flax path, torch key, torch shape,
  expected flax shape)``).
  """

  def __init__(self, message: str, *, unmapped=(), unknown=(), missing=(), unexpected=(), mismatched=()):
    super().__init__(message)
    self.unmapped = list(unmapped)
    self.unknown = list(unknown)
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)


# -- whitelisted globals ------------------------------------------------------------
class _TorchType(NamedTuple):
  """A ``torch.<X>Storage`` or ``torch.<dtype>`` global, resolved to its NumPy element type."""

  name: str
  dtype: np.dtype


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}


class _Storage(NamedTuple):
  """A flat storage of ``numel`` elements of ``dtype``.

  ``data`` is its 1-D array in native byte order, or None while not read yet;
  ``swap`` says the file's byte order is not native (for reinterpreting bytes).
  """

  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None
  swap: bool = False


def _as_ints(x, what: str) -> tuple[int, ...]:
  if not isinstance(x, (tuple, list)) or not all(isinstance(i, int) and i >= 0 for i in x):
    raise CheckpointError(f"tensor {what} must be a tuple of non-negative ints, got {x!r}")
  return tuple(x)


def _from_bytes(raw, dtype: np.dtype, swap: bool) -> np.ndarray:
  """1-D array of ``dtype`` over the bytes ``raw``, byte-swapped to native order when ``swap``."""
  if swap and dtype.itemsize > 1:
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: swap each part
    return np.frombuffer(raw, f"u{unit}").byteswap().view(dtype)
  return np.frombuffer(raw, dtype)


def _tensor(storage, offset, size, stride, dtype: _TorchType | None = None):
  """Array of shape ``size`` at element ``offset`` of ``storage`` with element ``stride``s (a copy)."""
  if not isinstance(storage, _Storage):
    raise CheckpointError(f"tensor storage must be a persistent storage, got {type(storage).__name__}")
  if not isinstance(offset, int) or offset < 0:
    raise CheckpointError(f"tensor offset must be a non-negative int, got {offset!r}")
  size, stride = _as_ints(size, "size"), _as_ints(stride, "stride")
  if len(size) != len(stride):
    raise CheckpointError(f"tensor size {size} and stride {stride} differ in length")
  numel, data = storage.numel, storage.data
  if dtype is not None and dtype.dtype != storage.dtype:  # an untyped (byte) storage viewed as `dtype`
    nbytes, itemsize = numel * storage.dtype.itemsize, dtype.dtype.itemsize
    if nbytes % itemsize:
      raise CheckpointError(f"storage {storage.key!r} of {nbytes} bytes cannot hold {dtype.name} elements "
                            f"of {itemsize} bytes")
    numel = nbytes // itemsize
    if data is not None:
      data = _from_bytes(data, dtype.dtype, storage.swap and storage.dtype.itemsize == 1)
  if 0 in size:
    return None if data is None else np.zeros(size, data.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= numel:
    raise CheckpointError(f"tensor of size {size}, stride {stride}, offset {offset} reaches element {last} "
                          f"of storage {storage.key!r}, which has {numel}")
  count = math.prod(size)
  if count > max(numel, _MAX_EXPANSION):
    raise CheckpointError(f"tensor of size {size}, stride {stride} expands storage {storage.key!r} of {numel} "
                          f"elements to {count}; overlapping tensors are limited to {_MAX_EXPANSION} elements")
  if data is None:  # first pass over a legacy file: only the layout is checked
    return None
  expanded = _EXPANDED.get()
  if count > numel and expanded is not None:  # the cap holds for the whole file, not per tensor
    expanded[0] += count
    if expanded[0] > _MAX_EXPANSION:
      raise CheckpointError(f"tensor of size {size}, stride {stride} expands storage {storage.key!r} of {numel} "
                            f"elements to {count}, bringing the overlapping tensors of this file to {expanded[0]} "
                            f"elements; they are limited to {_MAX_EXPANSION} in total")
  view = np.lib.stride_tricks.as_strided(data[offset:], size, [s * data.itemsize for s in stride], writeable=False)
  return np.array(view, order="C")


def _rebuild_tensor(storage, offset, size, stride):
  return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  if not isinstance(dtype, _TorchType):
    raise CheckpointError(f"tensor dtype must be a torch dtype, got {dtype!r}")
  return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  return data


def _latin1_bytes(text, encoding="latin1"):
  """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: latin-1 text -> bytes."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise CheckpointError(f"_codecs.encode is allowed only for latin-1 text, got {encoding!r}")
  return text.encode("latin1")


def _numpy_dtype(spec, align=False, *_):
  dt = np.dtype(spec, align=bool(align), copy=True)  # always a copy: BUILD then sets its state
  if dt.hasobject:
    raise CheckpointError("refusing to load a NumPy object dtype; ifjax reads only tensors, dicts, lists and numbers")
  return dt


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise CheckpointError(f"malformed NumPy scalar ({dtype!r}, {data!r})")
  return np.frombuffer(data, dtype)[0]


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _latin1_bytes,
    ("argparse", "Namespace"): argparse.Namespace,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _TorchType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", k): _TorchType(k, np.dtype(v)) for k, v in {**_STORAGE_DTYPES, **_TORCH_DTYPES}.items()},
}


class _Unpickler(pickle.Unpickler):
  """Builds only whitelisted globals; storages come from ``load_storage(pid)``."""

  def __init__(self, file, where: str, load_storage: Callable[[tuple], _Storage] | None = None):
    super().__init__(file, encoding="utf-8")
    self._where = where
    self._load_storage = load_storage

  def find_class(self, module: str, name: str):
    module = {"__builtin__": "builtins"}.get(module, module)
    obj = _ALLOWED.get((module, name))
    if obj is None:
      raise CheckpointError(f"{self._where}: refusing to load arbitrary object {module}.{name}; "
                            "ifjax reads only tensors, dicts, lists and numbers")
    return obj

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise CheckpointError(f"{self._where}: unexpected persistent id {pid!r} outside the payload")
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise CheckpointError(f"{self._where}: unsupported persistent id {pid!r} (only storages are read)")
    return self._load_storage(pid)


def _check_memo(file, where: str, what: str):
  """Parse (without running) the pickle at ``file``'s position and rewind; refuse out-of-range memo indices.

  CPython's unpickler grows its memo table to the largest index a PUT names, so
  a forged index would allocate gigabytes; a real pickle numbers its memo
  entries from 0, below its opcode count.
  """
  start, count, top = file.tell(), 0, -1
  for op, arg, _ in pickletools.genops(file):
    count += 1
    if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
      top = max(top, cast(int, arg))  # (a PUT's argument is its memo index)
  if top >= count:
    raise CheckpointError(f"{where}: corrupt {what} (memo index {top} in a pickle of {count} opcodes)")
  file.seek(start)


def _unpickle(file, where: str, what: str, load_storage=None):
  """One pickle from ``file``; malformed input -> CheckpointError naming ``what``."""
  try:
    _check_memo(file, where, what)
    return _Unpickler(file, where, load_storage).load()
  except CheckpointError as e:
    if str(e).startswith(where):
      raise
    raise CheckpointError(f"{where}: {what}: {e}") from e
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
          struct.error, OverflowError, RecursionError, MemoryError) as e:
    raise CheckpointError(f"{where}: corrupt or truncated {what} ({type(e).__name__}: {e})") from e


def _storage_pid(pid: tuple, where: str) -> tuple[np.dtype, str, int, tuple | None]:
  """``('storage', type, key, location, numel[, view])`` -> (dtype, key, numel, view)."""
  if len(pid) not in (5, 6):
    raise CheckpointError(f"{where}: malformed storage id {pid!r}")
  _, stype, key, _, numel, *view = pid
  if not isinstance(stype, _TorchType):
    raise CheckpointError(f"{where}: storage {key!r} has type {stype!r}, not a torch storage type")
  if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
    raise CheckpointError(f"{where}: malformed storage id {pid!r}")
  view = view[0] if view else None
  if view is not None and not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                               and all(isinstance(i, int) and i >= 0 for i in view[1:])):
    raise CheckpointError(f"{where}: malformed storage view {view!r} of storage {key!r}")
  return stype.dtype, key, numel, view


# -- zip format ---------------------------------------------------------------------
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError, RuntimeError)


def _read_zip(path: Path, where: str):
  try:
    zf = zipfile.ZipFile(path)
  except _ZIP_ERRORS as e:
    raise CheckpointError(f"{where}: corrupt or truncated zip archive ({e})") from e
  with zf:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      found = "none" if not pickles else ", ".join(pickles)
      raise CheckpointError(f"{where}: a torch zip checkpoint has exactly one <archive>/data.pkl entry; found {found}")
    prefix = pickles[0][: -len("data.pkl")]
    names = set(zf.namelist())

    def read(name: str) -> bytes:
      try:
        return zf.read(name)
      except _ZIP_ERRORS as e:
        raise CheckpointError(f"{where}: corrupt zip entry {name!r} ({e})") from e

    order = read(prefix + "byteorder").decode("ascii", "replace") if prefix + "byteorder" in names else "little"
    if order not in ("little", "big"):
      raise CheckpointError(f"{where}: byteorder entry says {order!r}, expected 'little' or 'big'")
    swap = order != sys.byteorder
    raw: dict[str, bytes] = {}
    storages: dict[tuple[str, np.dtype], _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
      dtype, key, numel, view = _storage_pid(pid, where)
      if (key, dtype) not in storages:
        name = f"{prefix}data/{key}"
        if key not in raw:
          if name not in names:
            raise CheckpointError(f"{where}: storage {key!r} has no entry {name!r} in the archive")
          raw[key] = read(name)
        need = numel * dtype.itemsize
        if len(raw[key]) < need:
          raise CheckpointError(f"{where}: truncated: storage {key!r} needs {need} bytes, {len(raw[key])} present")
        storages[key, dtype] = _Storage(key, dtype, numel, _from_bytes(raw[key][:need], dtype, swap), swap)
      return _view(storages[key, dtype], view, where)

    return _unpickle(io.BytesIO(read(pickles[0])), where, "payload pickle", load_storage)


# -- legacy format ------------------------------------------------------------------
def _read_legacy(buf: bytes, where: str):
  f = io.BytesIO(buf)
  magic = _unpickle(f, where, "header")
  if magic != _LEGACY_MAGIC:
    raise CheckpointError(f"{where}: not a PyTorch checkpoint (a pickle, but without torch's magic number)")
  version = _unpickle(f, where, "header")
  if version != _LEGACY_PROTOCOL:
    raise CheckpointError(f"{where}: legacy protocol version {version!r}; only {_LEGACY_PROTOCOL} is supported")
  sys_info = _unpickle(f, where, "header")
  if not isinstance(sys_info, dict):
    raise CheckpointError(f"{where}: malformed system-info header {sys_info!r}")
  little = bool(sys_info.get("little_endian", True))
  swap = little != (sys.byteorder == "little")
  start = f.tell()

  # Pass 1: which storages the payload uses (the data follows the payload).
  roots: dict[str, _Storage] = {}

  def declare(pid: tuple) -> _Storage:
    dtype, key, numel, view = _storage_pid(pid, where)
    root = roots.setdefault(key, _Storage(key, dtype, numel, None))
    if (root.dtype, root.numel) != (dtype, numel):
      raise CheckpointError(f"{where}: storage {key!r} is declared twice, as {root.numel} x {root.dtype} "
                            f"and as {numel} x {dtype}")
    return _view(root, view, where)

  _unpickle(f, where, "payload pickle", declare)
  keys = _unpickle(f, where, "storage key list")
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise CheckpointError(f"{where}: malformed storage key list")
  if set(roots) - set(keys):
    raise CheckpointError(f"{where}: storages {sorted(set(roots) - set(keys))} have no data record")
  pos = f.tell()
  count_fmt = "<q" if little else ">q"
  data: dict[str, _Storage] = {}
  for key in keys:
    if key not in roots:
      raise CheckpointError(f"{where}: data record for storage {key!r}, which the payload does not use")
    root = roots[key]
    if len(buf) - pos < 8:
      raise CheckpointError(f"{where}: truncated: storage {key!r} needs an 8-byte size, {len(buf) - pos} left")
    (count,) = struct.unpack_from(count_fmt, buf, pos)
    pos += 8
    if count != root.numel:
      raise CheckpointError(f"{where}: storage {key!r} record holds {count} elements, the payload says {root.numel}")
    need = count * root.dtype.itemsize
    if len(buf) - pos < need:
      raise CheckpointError(f"{where}: truncated: storage {key!r} needs {need} bytes, {len(buf) - pos} left")
    data[key] = root._replace(data=_from_bytes(memoryview(buf)[pos:pos + need], root.dtype, swap), swap=swap)
    pos += need

  # Pass 2: build the payload over the storages read.
  def load_storage(pid: tuple) -> _Storage:
    _, key, _, view = _storage_pid(pid, where)
    return _view(data[key], view, where)

  f.seek(start)
  return _unpickle(f, where, "payload pickle", load_storage)


def _view(root: _Storage, view: tuple | None, where: str) -> _Storage:
  """``root`` or its slice ``(view key, offset, size)`` (legacy storage views)."""
  if view is None:
    return root
  key, offset, size = view
  if offset + size > root.numel:
    raise CheckpointError(f"{where}: storage view {key!r} [{offset}:{offset + size}] exceeds storage {root.key!r} "
                          f"of {root.numel} elements")
  return root._replace(key=key, numel=size, data=None if root.data is None else root.data[offset:offset + size])


# -- public API ---------------------------------------------------------------------
def _truncated(items: list[str]) -> list[str]:
  """The first ``_LIST_LIMIT`` items, then "... and N more"."""
  more = len(items) - _LIST_LIMIT
  return items[:_LIST_LIMIT] + ([f"... and {more} more"] if more > 0 else [])


def read_torch(path: str | os.PathLike) -> Any:
  """The object ``torch.save`` wrote to ``path``, with every tensor as a NumPy array (shape and dtype kept).

  Reads the zip format and the legacy format; storages saved on any device
  (``cuda:0``) are read to host memory, and bfloat16 / float8 come back as
  ``ml_dtypes`` arrays. Containers (dict, OrderedDict, list, tuple, set),
  numbers, strings, ``argparse.Namespace`` and NumPy scalars are rebuilt; any
  other object raises :class:`CheckpointError` without being built. A missing
  file raises FileNotFoundError; a corrupt, truncated or foreign one
  CheckpointError.
  """
  path = Path(path)
  where = str(path)
  with open(path, "rb") as fh:
    head = fh.read(4)
  if not head:
    raise CheckpointError(f"{where}: empty file, not a PyTorch checkpoint")
  if head != _ZIP_MAGIC and head[:1] != b"\x80":  # every torch.save pickle starts with a PROTO opcode
    raise CheckpointError(f"{where}: not a PyTorch checkpoint (starts with {head!r}, neither a zip nor a pickle)")
  token = _EXPANDED.set([0])
  try:
    return _read_zip(path, where) if head == _ZIP_MAGIC else _read_legacy(path.read_bytes(), where)
  finally:
    _EXPANDED.reset(token)


_NESTED = ("state_dict", "model_state_dict", "model", "net")


def state_dict(obj: Any, prefix_strip: str | tuple[str, ...] = ("module.",)) -> dict[str, np.ndarray]:
  """The flat ``{name: array}`` state dict in a :func:`read_torch` result.

  Looks in ``obj["state_dict"]`` (or ``model_state_dict``, ``model``, ``net``)
  when that holds arrays, else in ``obj``. Keeps array values only and drops
  ``num_batches_tracked``; strips each prefix of ``prefix_strip`` that *all*
  keys carry (``module.`` of DataParallel).

  >>> sd = state_dict({"state_dict": {"module.fc.weight": np.zeros((2, 3)),
  ...                                 "module.bn.num_batches_tracked": np.array(5)}, "epoch": 3})
  >>> {k: v.shape for k, v in sd.items()}
  {'fc.weight': (2, 3)}
  """
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"expected a dict of tensors, got {type(obj).__name__}")
  src = obj
  for name in _NESTED:
    sub = obj.get(name)
    if isinstance(sub, Mapping) and any(isinstance(v, np.ndarray) for v in sub.values()):
      src = sub
      break
  out = {k: v for k, v in src.items()
         if isinstance(k, str) and isinstance(v, np.ndarray) and not k.endswith("num_batches_tracked")}
  if not out:
    shown = ", ".join(_truncated([repr(k) for k in obj])) or "none"
    raise CheckpointError(f"no tensors found in the checkpoint (top-level keys: {shown})")
  for prefix in (prefix_strip,) if isinstance(prefix_strip, str) else prefix_strip:
    if prefix and all(k.startswith(prefix) for k in out):
      out = {k[len(prefix):]: v for k, v in out.items()}
  return out


_LAYOUTS = ("conv", "dense", "vector")


def _perm(ndim: int, layout: str) -> tuple[int, ...] | None:
  """Axis order taking a torch array of ``ndim`` axes to Flax; None if ``layout`` needs another rank."""
  if layout == "conv":  # (O, I, *spatial) -> (*spatial, I, O)
    return (*range(2, ndim), 1, 0) if ndim >= 3 else None
  if layout == "dense":  # (out, in) -> (in, out)
    return (1, 0) if ndim == 2 else None
  return tuple(range(ndim))


def _shape_dtype(leaf) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of an array, a ShapeDtypeStruct or a scalar."""
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return tuple(leaf.shape), leaf.dtype
  a = np.asarray(leaf)
  return a.shape, a.dtype


def _listing(rows: list[str]) -> str:
  """One indented line per row, truncated."""
  return "".join(f"\n    {r}" for r in _truncated(rows))


def load_into(variables: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
              mapping: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
  """A new variables pytree with every leaf taken from ``tensors`` by ``mapping``.

  ``mapping`` is ``{flax path: (torch key, layout)}`` with paths like
  ``"params/conv1/kernel"`` and ``layout`` one of ``"conv"`` ((O, I, H, W) ->
  (H, W, I, O); any number of spatial axes), ``"dense"`` ((out, in) -> (in, out))
  or ``"vector"`` (as is). The result is nested plain dicts whose leaves are jax
  arrays of the template's dtypes (a template of ShapeDtypeStructs, from
  ``jax.eval_shape(model.init, ...)``, works too); ``variables`` is not modified.
  Every leaf must be mapped, every mapped key present with the right shape and
  every checkpoint key (but ``num_batches_tracked``) used, else
  :class:`CheckpointMismatchError` lists all problems at once.
  """
  template = flatten(variables)
  for path, entry in mapping.items():
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ValueError(f"mapping[{path!r}] must be (torch key, layout), got {entry!r}")
    if entry[1] not in _LAYOUTS:
      raise ValueError(f"mapping[{path!r}] has layout {entry[1]!r}; expected one of {', '.join(map(repr, _LAYOUTS))}")
  unmapped = [p for p in template if p not in mapping]
  unknown = [p for p in mapping if p not in template]
  missing, missing_rows, mismatched, mismatched_rows, out = [], [], [], [], {}
  for path in template:
    if path not in mapping:
      continue
    key, layout = mapping[path]
    if key not in tensors:
      missing.append(key)
      missing_rows.append(f"{key!r} (for {path})")
      continue
    arr = np.asarray(tensors[key])
    shape, dtype = _shape_dtype(template[path])
    perm = _perm(arr.ndim, layout)
    if perm is None or tuple(arr.shape[i] for i in perm) != shape:
      mismatched.append((path, key, arr.shape, shape))
      want = _perm(len(shape), layout)
      want = f" (torch {tuple(shape[i] for i in np.argsort(want))})" if want is not None and layout != "vector" else ""
      have = (f"is {tuple(arr.shape[i] for i in perm)} as {layout!r}" if perm is not None
              else f"has the wrong rank for {layout!r}")
      mismatched_rows.append(f"{path} <- {key!r}: checkpoint {arr.shape} {have}; variables need {shape}{want}")
      continue
    out[path] = jnp.asarray(arr.transpose(perm), dtype=dtype)
  used = {key for key, _ in mapping.values()}
  unexpected = [k for k in tensors if k not in used and not k.endswith("num_batches_tracked")]
  if unmapped or unknown or missing or unexpected or mismatched:
    parts = [(unmapped, "variable(s) without a mapping entry", unmapped),
             (unknown, "mapping path(s) not in the variables", unknown),
             (missing, "key(s) missing from the checkpoint", missing_rows),
             (unexpected, "unexpected key(s) in the checkpoint", [repr(k) for k in unexpected]),
             (mismatched, "mis-shaped", mismatched_rows)]
    msg = "checkpoint does not fit the variables:" + "".join(
        f"\n  {len(items)} {what}:{_listing(rows)}" for items, what, rows in parts if items)
    raise CheckpointMismatchError(msg, unmapped=unmapped, unknown=unknown, missing=missing, unexpected=unexpected,
                                  mismatched=mismatched)
  return unflatten(out)
