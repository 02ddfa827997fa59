"""Pruned-model and training-state checkpoints on orbax.

A checkpoint is a directory holding two orbax items, written in one atomic
orbax save (into ``<path>.orbax-checkpoint-tmp``, renamed to ``<path>`` once
complete, so a directory named ``<path>`` is always whole):

* ``arrays/``: an orbax PyTree ``{"<leaf index>": array}`` of the non-empty array leaves;
* ``meta/ifjax.json``: the manifest: the tree's structure, each leaf's key path,
  kind, shape, dtype and CRC-32, and the caller's JSON metadata.

Reading needs no template: shapes and dtypes come from the manifest, so a
pruned model comes back at its pruned shapes, bit-exact, each array checked
against its CRC-32.

Multi-host (``jax.process_count() > 1``): every process calls the same function;
orbax synchronises them. The manifest and the fully addressable arrays (stored
as NumPy) are written by process 0, so those must be equal on all processes;
arrays sharded across processes are written shard by shard by their owners,
without a CRC-32. Every process reads back whole, process-local arrays.

>>> import shutil, tempfile
>>> import numpy as np
>>> d = tempfile.mkdtemp()
>>> _ = write_tree(f"{d}/ck_3", {"w": np.arange(3.0), "step": 3}, {"epoch": 1})
>>> latest(d, "ck").name
'ck_3'
>>> read_tree(f"{d}/ck_3")
({'w': array([0., 1., 2.]), 'step': 3}, {'epoch': 1})
>>> shutil.rmtree(d)
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from ifjax._checkpoint import CheckpointError
from ifjax._errors import ArgumentTypeError
from ifjax._spec import Spec, Variables, flatten, pruned_widths, resized_spec

__all__ = ["SaveFormatError", "check_path", "latest", "read_tree", "restore", "save", "write_tree"]

_FORMAT = "ifjax"
_VERSION = 1
_MANIFEST = "ifjax.json"  # inside the "meta" item
_MODEL = "ifjax.save"  # the meta key under which save() stores the spec and widths
_KINDS = ("jax", "numpy", "numpy_scalar", "python", "key")  # what a leaf was, so it comes back as the same


class SaveFormatError(CheckpointError):
  """An ifjax checkpoint directory is missing, incomplete, corrupt, or does not match what reading it expects."""


# -- low level: any pytree -------------------------------------------------------------------------
# orbax / tensorstore read these as glob patterns: the arrays are silently not written (a backslash only where it
# is not the path separator)
_GLOB_CHARS = "[]" + ("\\" if os.sep == "/" else "")


def check_path(path: str | os.PathLike, what: str = "path") -> Path:
  """``path`` as an absolute :class:`~pathlib.Path` if orbax can write a checkpoint there; the shared check of
  every writer (:func:`write_tree`, :func:`save`, ``train.fit(checkpoint_dir=...)``).

  Orbax treats ``[``, ``]`` and a backslash anywhere in the absolute path as a glob pattern: the save returns
  normally with a logged warning but writes no array, and reading it back fails. Such paths raise
  :class:`CheckpointError` naming ``what`` before anything is written; a non-path raises ``TypeError``.
  """
  if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
    raise TypeError(f"{what} must be a str or os.PathLike path, got {type(path).__name__}")
  full = Path(path).absolute()
  bad = sorted({c for c in str(full) if c in _GLOB_CHARS})
  if bad:
    raise CheckpointError(f"{what}={str(path)!r}: the checkpoint path {str(full)!r} contains "
                          f"{' and '.join(map(repr, bad))}, which orbax reads as a glob pattern (it would save no "
                          "array data and only log a warning); pick a path without '[', ']' or '\\'")
  return full


def write_tree(path: str | os.PathLike, tree: Any, meta: Mapping[str, Any]) -> Path:
  """Writes ``tree`` and the JSON-able ``meta`` to the new checkpoint directory ``path``; returns its absolute path.

  ``tree`` is any pytree :func:`flax.serialization.to_state_dict` handles (dicts,
  lists, NamedTuples such as optax states, flax structs) with leaves that are
  jax or NumPy arrays of any shape and numeric dtype (bfloat16 and PRNG keys
  included), NumPy or Python scalars, or None. Synchronous; atomic (see the module
  docstring). Raises ``FileExistsError`` if ``path`` exists.
  """
  import orbax.checkpoint as ocp

  path = check_path(path, "write_tree: path")
  if not isinstance(meta, Mapping):
    raise TypeError(f"write_tree: meta must be a dict, got {type(meta).__name__}")
  if path.exists():
    raise FileExistsError(f"{path} already exists; checkpoints are never overwritten, remove it or pick a new path")
  leaves: list[dict] = []
  arrays: dict[str, Any] = {}

  def encode(node, keys):
    if isinstance(node, Mapping):
      bad = [k for k in node if not isinstance(k, str)]
      if bad:
        raise TypeError(f"write_tree: dict at {_name(keys)!r} has non-string keys {bad[:5]}")
      return {k: encode(v, (*keys, k)) for k, v in node.items()}
    if node is None:
      return None
    arr, record = _leaf(node, keys)
    if arr.size:
      arrays[str(len(leaves))] = arr
    leaves.append(record)
    return len(leaves) - 1

  structure = encode(flax.serialization.to_state_dict(tree), ())
  manifest = {"format": _FORMAT, "version": _VERSION, "structure": structure, "leaves": leaves, "meta": dict(meta)}
  try:
    json.dumps(manifest)
  except (TypeError, ValueError) as e:
    raise TypeError(f"write_tree: meta must be JSON-serialisable: {e}") from None
  items: dict[str, Any] = {"meta": ocp.args.JsonSave(manifest)}
  if arrays:
    items["arrays"] = ocp.args.PyTreeSave(arrays)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_registry(ocp))) as ckptr:
    ckptr.save(path, ocp.args.Composite(**items))
  return path


def read_tree(path: str | os.PathLike, template: Any = None) -> tuple[Any, dict]:
  """``(tree, meta)`` of a :func:`write_tree` checkpoint.

  Without ``template`` the tree is the saved state dict (nested dicts; NamedTuples
  and lists became dicts keyed by field name / index); with one (a pytree of the
  saved structure, any leaves) it is rebuilt into that structure by
  :func:`flax.serialization.from_state_dict`. Leaves come back as they were
  saved: jax arrays, NumPy arrays or scalars, Python scalars, None. Raises
  :class:`SaveFormatError` naming ``path`` if it is missing, not a checkpoint,
  corrupt, or does not match ``template``.
  """
  path = Path(path).absolute()
  manifest = _read_manifest(path)
  records = manifest["leaves"]
  stored = _read_arrays(path, {str(i): r for i, r in enumerate(records) if math.prod(r["shape"])})
  values = [_restore_leaf(path, r, stored.get(str(i))) for i, r in enumerate(records)]

  def build(node):
    if isinstance(node, dict):
      return {k: build(v) for k, v in node.items()}
    return None if node is None else values[node]

  tree = build(manifest["structure"])
  if template is not None:
    tree = _into(path, template, tree, "template")
  return tree, manifest["meta"]


def latest(directory: str | os.PathLike, prefix: str) -> Path | None:
  """The complete checkpoint ``<directory>/<prefix>_<int>`` with the largest int, or None.

  Orbax's temporary directories (``<prefix>_<int>.orbax-checkpoint-tmp``) and
  directories without a manifest are ignored, as is a missing ``directory``.
  """
  directory = Path(directory)
  if not directory.is_dir():
    return None
  pattern = re.compile(re.escape(prefix) + r"_(\d+)")
  found = [(int(m.group(1)), p) for p in directory.iterdir()
           if (m := pattern.fullmatch(p.name)) and (p / "meta" / _MANIFEST).is_file()]
  return max(found)[1] if found else None


# -- high level: a pruned model ------------------------------------------------------------------
def save(path: str | os.PathLike, variables: Variables, spec: Spec, widths: Mapping[str, int] | None = None,
         state: Any = None, *, plan: Mapping[str, Any] | None = None) -> Path:
  """Writes a (pruned) model to the new checkpoint directory ``path``; returns its absolute path.

  Args:
    path: a directory that does not exist yet.
    variables: Flax variables ``{"params": ..., "batch_stats": ...}`` at any (pruned) shapes.
    spec: the spec describing ``variables``; for a pruned zoo model, the spec of
      ``ifjax.models.get(name, widths=widths)``. With ``plan``: the spec the plan was made with.
    widths: ``{group name: neuron count}`` (e.g. ``ifjax.widths(variables, spec, plan)``) or None.
    state: an optional training state, any pytree :func:`write_tree` accepts
      (e.g. a NamedTuple of params, batch stats, optax state, step).
    plan: the plan (of :func:`ifjax.plan`) that made ``variables`` (``apply_plan``'s output) from the model
      ``spec`` describes: the pruned spec (:meth:`ifjax.Plan.spec`) is saved, with the pruned widths unless
      ``widths`` is given, so no zoo rebuild is needed and :func:`restore` gives back a spec of the pruned
      variables.

  Raises ``ValueError`` if ``spec`` does not describe ``variables`` or ``widths``
  disagrees with them, before anything is written.
  """
  check_path(path, "save: path")
  if not isinstance(spec, Spec):
    raise ArgumentTypeError(f"save({str(path)!r}): spec must be an ifjax.Spec, got {type(spec).__name__}")
  if not isinstance(variables, Mapping):
    raise ArgumentTypeError(f"save({str(path)!r}): variables must be a Flax variables dict, got "
                            f"{type(variables).__name__}")
  if widths is not None and not isinstance(widths, Mapping):
    raise ArgumentTypeError(f"save({str(path)!r}): widths must be a dict {{group name: int}}, got "
                            f"{type(widths).__name__}")
  try:
    if plan is not None:
      spec, widths = _pruned(variables, spec, plan, widths)
    widths = _check_widths(variables, spec, widths)
  except ValueError as e:
    raise type(e)(f"save({str(path)!r}): {e}") from None
  meta = {_MODEL: {"spec": json.loads(spec.to_json()), "widths": widths}}
  return write_tree(path, {"variables": variables, "state": state}, meta)


def restore(path: str | os.PathLike, state_template: Any = None) -> tuple[dict, Spec, dict[str, int] | None, Any]:
  """``(variables, spec, widths, state)`` of a :func:`save` checkpoint, at the saved (pruned) shapes.

  The spec is validated against the restored variables and every saved width
  against the spec's neuron count. ``state`` is None if none was saved; else the
  saved state dict, or, with ``state_template`` (a pytree of the saved state's
  structure, e.g. the freshly built training state), that structure
  (NamedTuples included). Raises :class:`SaveFormatError` naming ``path``.
  """
  tree, meta = read_tree(path)
  path = Path(path).absolute()
  if _MODEL not in meta or not isinstance(tree, dict) or set(tree) != {"variables", "state"}:
    raise SaveFormatError(f"{path}: not a model checkpoint of ifjax.save (it was written by write_tree)")
  try:
    spec = Spec.from_json(json.dumps(meta[_MODEL]["spec"]))
    saved_widths = meta[_MODEL]["widths"]
  except (KeyError, TypeError, ValueError) as e:
    raise SaveFormatError(f"{path}: the saved spec is malformed: {e!r}") from None
  variables, state = tree["variables"], tree["state"]
  try:
    widths = _check_widths(variables, spec, saved_widths)
  except ValueError as e:
    raise SaveFormatError(f"{path}: the saved spec or widths do not match the restored variables: {e}") from None
  if state_template is not None:
    if state is None:
      raise SaveFormatError(f"{path}: a state_template was given, but the checkpoint has no training state")
    state = _into(path, state_template, state, "state_template")
  return variables, spec, widths, state


# -- helpers -------------------------------------------------------------------------------------
def _pruned(variables: Variables, spec: Spec, plan: Mapping[str, Any], widths: Mapping[str, int] | None):
  """``(spec, widths)`` to save for the pruned ``variables`` of ``plan``: the plan's pruned spec and widths (the
  given ``widths`` if any)."""
  source: Any = getattr(plan, "source_spec", None)  # an ifjax.Plan's; any mapping of GroupPlans is taken
  if source is not None and spec != source and spec == plan.spec():  # pyright: ignore[reportAttributeAccessIssue]
    spec = source  # the pruned spec itself was passed
  which, after = pruned_widths(variables, spec, plan)
  if which == "before" and any(gp.m != gp.n for gp in plan.values()):
    raise ValueError("plan=: the variables are the ones the plan was made for; pass the pruned ones, "
                     "ifjax.apply_plan(variables, spec, plan) (or intra_fuse / prune with the same options)")
  pruned = resized_spec(spec, {k: (gp.n, gp.m) for k, gp in plan.items()}, {p: np.ndim(a) for p, a in
                                                                            flatten(variables).items()})
  return pruned, (after if widths is None else widths)


def _registry(ocp):
  """Orbax handlers: the manifest is the JSON item "meta", in a file of our name."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("meta", ocp.args.JsonSave, ocp.JsonCheckpointHandler(_MANIFEST))
  return registry


def _name(keys) -> str:
  return "/".join(keys) or "<root>"


def _crc32(arr: np.ndarray) -> int:
  # (an ndarray is a buffer; NumPy's stubs do not say so to zlib's)
  return zlib.crc32(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # pyright: ignore[reportArgumentType]


def _leaf(node, keys) -> tuple[Any, dict]:
  """A leaf -> (array to store, manifest record). Fully addressable jax arrays are stored as NumPy."""
  record: dict[str, Any] = {"path": list(keys)}
  if isinstance(node, jax.Array):
    if jax.dtypes.issubdtype(node.dtype, jax.dtypes.prng_key):  # pyright: ignore[reportPrivateImportUsage]
      record.update(kind="key", impl=str(jax.random.key_impl(node)))
      node = jax.random.key_data(node)
    else:
      record["kind"] = "jax"
    arr = np.asarray(node) if node.is_fully_addressable else node
  elif isinstance(node, (np.ndarray, np.generic)):
    record["kind"] = "numpy" if isinstance(node, np.ndarray) else "numpy_scalar"
    arr = np.asarray(node)
  elif isinstance(node, (bool, int, float)):
    record["kind"] = "python"
    arr = np.asarray(node)
  else:
    raise TypeError(f"write_tree: leaf {_name(keys)!r} is a {type(node).__name__}; leaves must be jax or NumPy "
                    "arrays, NumPy or Python scalars, or None")
  if arr.dtype.kind in "OSUMm":
    raise TypeError(f"write_tree: leaf {_name(keys)!r} has unsupported dtype {arr.dtype}")
  record.update(shape=list(arr.shape), dtype=arr.dtype.name, crc32=_crc32(arr) if isinstance(arr, np.ndarray) else None)
  return arr, record


def _read_manifest(path: Path) -> dict:
  """The checked manifest of the checkpoint at ``path`` (dtypes parsed, shapes as tuples)."""
  if not path.is_dir():
    partial = path.with_name(path.name + ".orbax-checkpoint-tmp")
    hint = f" (an unfinished save left {partial})" if partial.exists() else ""
    raise SaveFormatError(f"no checkpoint directory at {path}{hint}")
  file = path / "meta" / _MANIFEST
  if not file.is_file():
    raise SaveFormatError(f"{path} is not an ifjax checkpoint: it has no manifest {file}")
  try:
    manifest = json.loads(file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SaveFormatError(f"{path}: the manifest {file} is corrupt: {e}") from None
  if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
    raise SaveFormatError(f"{path}: {file} is not an ifjax manifest")
  if manifest.get("version") != _VERSION:
    raise SaveFormatError(f"{path}: {file} has format version {manifest.get('version')!r}; "
                          f"this ifjax reads version {_VERSION}")
  try:
    for r in manifest["leaves"]:
      if (r["kind"] not in _KINDS or not isinstance(r["path"], list) or not all(isinstance(k, str) for k in r["path"])
          or not isinstance(r["crc32"], (int, type(None))) or (r["kind"] == "key" and not isinstance(r["impl"], str))):
        raise ValueError(f"bad leaf record {r}")
      r["shape"], r["dtype"] = tuple(int(n) for n in r["shape"]), jnp.dtype(r["dtype"])
    used = []

    def walk(node):
      if isinstance(node, dict):
        for v in node.values():
          walk(v)
      elif isinstance(node, int):
        used.append(node)
      elif node is not None:
        raise ValueError(f"the structure has {node!r} where a leaf index belongs")

    walk(manifest["structure"])
    if sorted(used) != list(range(len(manifest["leaves"]))):
      raise ValueError("the structure does not index every leaf record exactly once")
    if not isinstance(manifest["meta"], dict):
      raise ValueError("meta is not a dict")
  except (KeyError, TypeError, ValueError) as e:
    raise SaveFormatError(f"{path}: the manifest {file} is malformed: {e!r}") from None
  return manifest


def _read_arrays(path: Path, records: dict[str, dict]) -> dict[str, np.ndarray]:
  """The stored arrays ``{leaf index: array}`` as NumPy, orbax's errors re-raised with ``path``."""
  if not records:
    return {}
  import orbax.checkpoint as ocp

  item = {k: jax.ShapeDtypeStruct(r["shape"], r["dtype"]) for k, r in records.items()}
  restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in records}
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      out = ckptr.restore(path, ocp.args.Composite(arrays=ocp.args.PyTreeRestore(item, restore_args))).arrays
  except Exception as e:  # tensorstore / orbax raise many types; all mean the array data is unreadable
    msg = str(e)
    raise SaveFormatError(f"{path}: the array data under {path / 'arrays'} is missing or corrupt: "
                          f"{type(e).__name__}: {msg[:400]}{'...' if len(msg) > 400 else ''}") from e
  return dict(out)


def _restore_leaf(path: Path, record: dict, arr: np.ndarray | None):
  """Checks one array against its manifest record and turns it back into the kind of leaf that was saved."""
  name, shape, dtype = _name(record["path"]), record["shape"], record["dtype"]
  if arr is None:  # zero-size: not stored
    arr = np.zeros(shape, dtype)
  arr = np.asarray(arr)
  if arr.shape != shape or arr.dtype != dtype:
    raise SaveFormatError(f"{path}: array {name!r} was read as {arr.dtype}{list(arr.shape)}, "
                          f"but the manifest says {dtype}{list(shape)}")
  if record["crc32"] is not None and _crc32(arr) != record["crc32"]:
    raise SaveFormatError(f"{path}: array {name!r} is corrupt: its CRC-32 does not match the manifest")
  kind = record["kind"]
  if kind == "jax":
    return jnp.asarray(arr)
  if kind == "key":
    return jax.random.wrap_key_data(arr, impl=record["impl"])  # pyright: ignore[reportArgumentType] (takes NumPy)
  if kind == "python":
    return arr.item()
  return arr[()] if kind == "numpy_scalar" else arr


def _check_widths(variables: Variables, spec: Spec, widths: Mapping[str, int] | None) -> dict[str, int] | None:
  """Validates ``spec`` on ``variables`` and ``widths`` against its neuron counts; ``widths`` as plain ints."""
  try:
    sizes = spec.validate(variables)
  except ValueError as e:
    raise ValueError(f"the spec does not describe the variables: {e} (the spec of a pruned zoo model is that of "
                     "ifjax.models.get(name, widths=widths))") from None
  if widths is None:
    return None
  if not isinstance(widths, Mapping):
    raise ValueError(f"widths must be a dict {{group name: int}}, got {type(widths).__name__}")
  problems = [f"unknown group {k!r}" for k in widths if k not in sizes]
  for k, w in widths.items():
    if not isinstance(w, (int, np.integer)) or isinstance(w, bool):
      problems.append(f"{k!r}: width {w!r} is not an int")
    elif k in sizes and w != sizes[k]:
      problems.append(f"{k!r}: width {w} but the variables have {sizes[k]} neurons")
  if problems:
    raise ValueError("widths disagree with the variables: " + "; ".join(problems))
  return {k: int(v) for k, v in widths.items()}


def _flat(node, keys=(), out=None) -> dict[tuple, Any]:
  """Nested dicts -> ``{key path: leaf}``; an empty dict is a leaf of its own."""
  out = {} if out is None else out
  if isinstance(node, Mapping) and node:
    for k, v in node.items():
      _flat(v, (*keys, str(k)), out)
  else:
    out[keys] = node
  return out


def _into(path: Path, template: Any, tree: Any, what: str) -> Any:
  """``tree`` (a state dict) rebuilt into the structure of ``template``; mismatches raise with ``path``."""
  want, got = _flat(flax.serialization.to_state_dict(template)), _flat(tree)
  missing = [_name(k) for k in want if k not in got]
  extra = [_name(k) for k in got if k not in want]
  shapes = [f"{_name(k)!r} is {np.shape(got[k])} in the checkpoint but {np.shape(w)} in the {what}"
            for k, w in want.items() if k in got and hasattr(w, "shape") and np.shape(w) != np.shape(got[k])]
  problems = ([f"missing from the checkpoint: {missing[:10]}"] if missing else []) + (
      [f"missing from the {what}: {extra[:10]}"] if extra else []) + shapes[:10]
  if not problems:
    try:
      return flax.serialization.from_state_dict(template, tree)
    except (KeyError, TypeError, ValueError) as e:
      problems = [repr(e)]
  raise SaveFormatError(f"{path}: the {what} does not match the saved tree: " + "; ".join(problems))
