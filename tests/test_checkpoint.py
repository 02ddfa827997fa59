"""read_torch / state_dict / load_into: torch fixtures, crafted and hostile files, real checkpoints.

The fixtures under tests/fixtures/ were written by torch (see make_fixtures.py);
nothing here needs torch, which is used only for optional cross-checks.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ifjax._checkpoint import CheckpointError, CheckpointMismatchError, load_into, read_torch, state_dict
from ifjax.data import data_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = dict(np.load(FIXTURES / "expected.npz"))
DTYPES = {
    "f32": np.float32, "f64": np.float64, "f16": np.float16, "bf16": ml_dtypes.bfloat16, "i64": np.int64,
    "i32": np.int32, "i8": np.int8, "u8": np.uint8, "bool": np.bool_, "c64": np.complex64,
    "transposed": np.float32, "shared_a": np.float32, "shared_b": np.float32, "param": np.float32, "scalar": np.int64,
}
TENSOR_FILES = ["tensors_legacy.pt", "tensors_zip.pt"]
CHECKPOINT_FILES = ["checkpoint_legacy.th", "checkpoint_zip.th"]
ALL_FILES = TENSOR_FILES + CHECKPOINT_FILES


# -- crafting checkpoints without torch ---------------------------------------------
class G(NamedTuple):
  """A pickled global ``module.name`` (written without importing it)."""

  module: str
  name: str


class Call(NamedTuple):
  """``func(*args)`` as a REDUCE."""

  func: Any
  args: tuple


class Pid(NamedTuple):
  """A persistent id."""

  pid: tuple


class _Writer(pickle._Pickler):
  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, Pid) else None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, G):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    elif isinstance(obj, Call):
      self.save(obj.func)
      self.save(obj.args)
      self.write(pickle.REDUCE)
    else:
      super().save(obj, save_persistent_id)


def dumps(obj) -> bytes:
  buf = io.BytesIO()
  _Writer(buf, protocol=2).dump(obj)
  return buf.getvalue()


def tensor(stype, key, numel, offset, size, stride, view=None, legacy=False):
  """A ``_rebuild_tensor_v2`` call over storage ``key`` of type ``torch.<stype>``."""
  pid = ("storage", G("torch", stype), key, "cpu", numel) + ((view,) if legacy else ())
  return Call(G("torch._utils", "_rebuild_tensor_v2"),
              (Pid(pid), offset, size, stride, False, Call(G("collections", "OrderedDict"), ())))


def raw(arr: np.ndarray, big: bool = False) -> bytes:
  """``arr``'s bytes, little- or big-endian."""
  if big and arr.dtype.itemsize > 1:
    unit = arr.dtype.itemsize // 2 if arr.dtype.kind == "c" else arr.dtype.itemsize
    return arr.view(f"u{unit}").byteswap().tobytes()
  return arr.tobytes()


def write_zip(path, payload_pickle: bytes, storages: dict[str, bytes], byteorder=None, prefix="archive"):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{prefix}/data.pkl", payload_pickle)
    if byteorder:
      z.writestr(f"{prefix}/byteorder", byteorder)
    for k, b in storages.items():
      z.writestr(f"{prefix}/data/{k}", b)
  return path


def write_legacy(path, payload_pickle: bytes, records: list[tuple[str, int, bytes]], little=True):
  """Magic, protocol, sys info, payload, key list, then ``count, bytes`` per record."""
  f = io.BytesIO()
  for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": little}):
    pickle.dump(x, f, protocol=2)
  f.write(payload_pickle)
  pickle.dump([k for k, _, _ in records], f, protocol=2)
  for _, count, data in records:
    f.write(struct.pack("<q" if little else ">q", count) + data)
  path.write_bytes(f.getvalue())
  return path


# -- torch-written fixtures ---------------------------------------------------------
@pytest.mark.parametrize("name", TENSOR_FILES)
def test_fixture_tensors_exact(name):
  got = read_torch(FIXTURES / name)
  assert type(got) is collections.OrderedDict and list(got) == list(DTYPES)
  for k, dtype in DTYPES.items():
    a = got[k]
    assert a.dtype == np.dtype(dtype), k
    np.testing.assert_array_equal(a.astype(np.float32) if k == "bf16" else a, EXPECTED[f"tensors.{k}"], err_msg=k)
    assert a.flags.c_contiguous and a.flags.writeable
  assert got["transposed"].shape == (5, 3) and got["scalar"].shape == ()
  np.testing.assert_array_equal(got["shared_a"], np.arange(2, 8).reshape(2, 3))
  np.testing.assert_array_equal(got["shared_b"], [[5, 7], [9, 11]])
  assert not np.shares_memory(got["shared_a"], got["shared_b"])


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_fixture_training_checkpoint(name):
  got = read_torch(FIXTURES / name)
  assert got["best_prec1"] == 91.7 and got["epoch"] == 3
  assert isinstance(got["args"], argparse.Namespace)
  assert vars(got["args"]) == {"arch": "tiny", "lr": 0.1, "milestones": [100, 150]}
  assert got["state_dict"]["module.bn.num_batches_tracked"] == 3
  sd = state_dict(got)
  assert list(sd) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                      "fc.weight", "fc.bias"]
  for k, v in sd.items():
    np.testing.assert_array_equal(v, EXPECTED[f"checkpoint.module.{k}"])


def test_legacy_and_zip_agree():
  for a, b in (TENSOR_FILES, CHECKPOINT_FILES):
    sa, sb = state_dict(read_torch(FIXTURES / a)), state_dict(read_torch(FIXTURES / b))
    assert list(sa) == list(sb)
    for k in sa:
      assert sa[k].dtype == sb[k].dtype
      np.testing.assert_array_equal(sa[k], sb[k])


def test_fixtures_are_small():
  for p in FIXTURES.iterdir():
    assert p.stat().st_size < 20_000, p


def _assert_same_as_torch(got, ref, torch):
  """Recursive equality of a read_torch result and a torch.load result."""
  if isinstance(ref, torch.Tensor):
    ref = ref.detach()
    if ref.dtype == torch.bfloat16:
      ref, got = ref.float(), got.astype(np.float32)
    ref = ref.numpy()
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
  elif isinstance(ref, dict):
    assert list(got) == list(ref)
    for k in ref:
      _assert_same_as_torch(got[k], ref[k], torch)
  elif isinstance(ref, argparse.Namespace):
    assert vars(got) == vars(ref)
  else:
    assert got == ref


@pytest.mark.parametrize("name", ALL_FILES)
def test_fixtures_match_torch_load(name):
  torch = pytest.importorskip("torch")
  ref = torch.load(FIXTURES / name, map_location="cpu", weights_only=False)
  _assert_same_as_torch(read_torch(FIXTURES / name), ref, torch)


# -- crafted files: byte order, views, prefixes, v3 ---------------------------------
def test_zip_big_endian_and_any_archive_prefix(tmp_path):
  vals = {"FloatStorage": np.array([1.5, -2.25, 3.0], np.float32), "ShortStorage": np.array([-2, 300], np.int16),
          "ComplexFloatStorage": np.array([1 + 2j, -3j], np.complex64),
          "BFloat16Storage": np.array([0.5, -7.0], ml_dtypes.bfloat16), "BoolStorage": np.array([True, False])}
  payload = {k: tensor(k, str(i), v.size, 0, v.shape, (1,)) for i, (k, v) in enumerate(vals.items())}
  for order, big in (("big", True), ("little", False), (None, False)):
    path = write_zip(tmp_path / f"{order}.pt", dumps(payload),
                     {str(i): raw(v, big) for i, v in enumerate(vals.values())}, order, prefix="weird-Name_1")
    got = read_torch(path)
    for k, v in vals.items():
      assert got[k].dtype == v.dtype and got[k].dtype.isnative
      np.testing.assert_array_equal(got[k], v, err_msg=f"{order} {k}")


def test_rebuild_tensor_v3_reinterprets_untyped_bytes(tmp_path):
  v = np.array([1, 2, 65535], np.uint16)
  storage = Pid(("storage", G("torch.storage", "UntypedStorage"), "0", "cpu", 6))
  payload = Call(G("torch._utils", "_rebuild_tensor_v3"),
                 (storage, 1, (2,), (1,), False, Call(G("collections", "OrderedDict"), ()), G("torch", "uint16")))
  for order in ("little", "big"):
    path = write_zip(tmp_path / f"{order}.pt", dumps(payload), {"0": raw(v, order == "big")}, order)
    np.testing.assert_array_equal(read_torch(path), [2, 65535])


def test_legacy_big_endian_storage_views_and_rebuild_variants(tmp_path):
  base = np.arange(10, dtype=np.float64) / 4
  payload = {
      "whole": tensor("DoubleStorage", "k", 10, 0, (2, 5), (5, 1), legacy=True),
      "view": tensor("DoubleStorage", "k", 10, 1, (2,), (2,), view=("k_view", 3, 5), legacy=True),  # base[3:8][1::2]
      "v1": Call(G("torch._utils", "_rebuild_tensor"),
                 (Pid(("storage", G("torch", "DoubleStorage"), "k", "cpu", 10, None)), 4, (3,), (1,))),
      "param": Call(G("torch.nn.parameter", "Parameter"), (tensor("DoubleStorage", "k", 10, 0, (1,), (1,), legacy=True),
                                                           True)),
  }
  for little in (True, False):
    path = write_legacy(tmp_path / f"{little}.pt", dumps(payload), [("k", 10, raw(base, big=not little))], little)
    got = read_torch(path)
    np.testing.assert_array_equal(got["whole"], base.reshape(2, 5))
    np.testing.assert_array_equal(got["view"], [base[4], base[6]])
    np.testing.assert_array_equal(got["v1"], base[4:7])
    np.testing.assert_array_equal(got["param"], base[:1])


def test_numpy_scalars_sets_and_bytes(tmp_path):
  obj = {"acc": np.float64(91.5), "ids": {1, 2}, "blob": b"\x00\xff", "span": slice(1, 5)}
  path = write_zip(tmp_path / "a.pt", pickle.dumps(obj, protocol=2), {})
  got = read_torch(path)
  assert got == obj and type(got["acc"]) is np.float64


# -- bad input ----------------------------------------------------------------------
def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    read_torch(tmp_path / "nope.pt")


@pytest.mark.parametrize("name", ALL_FILES)
@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9, 0.999])
def test_truncated_fixture(tmp_path, name, frac):
  data = (FIXTURES / name).read_bytes()
  path = tmp_path / name
  path.write_bytes(data[: int(len(data) * frac)])
  with pytest.raises(CheckpointError, match="truncated") as e:
    read_torch(path)
  assert str(path) in str(e.value)


def test_truncated_storage_message(tmp_path):
  data = (FIXTURES / "tensors_legacy.pt").read_bytes()
  path = tmp_path / "cut.pt"
  path.write_bytes(data[:-4])
  with pytest.raises(CheckpointError, match=r"truncated: storage '\d+' needs \d+ bytes, \d+ left"):
    read_torch(path)
  path = write_zip(tmp_path / "z.pt", dumps([tensor("FloatStorage", "0", 6, 0, (6,), (1,))]), {"0": bytes(10)})
  with pytest.raises(CheckpointError, match="truncated: storage '0' needs 24 bytes, 10 present"):
    read_torch(path)


@pytest.mark.parametrize("content, match", [
    (b"", "empty file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(17), r"not a PyTorch checkpoint \(starts with b'\\x89PNG'"),
    (np.random.default_rng(1).bytes(4096), "not a PyTorch checkpoint"),
    (b"\x80\x02" + np.random.default_rng(2).bytes(4096), "corrupt or truncated header"),
    (b"PK\x03\x04" + np.random.default_rng(3).bytes(4096), "corrupt or truncated zip archive"),
    (pickle.dumps({"a": 1}, protocol=2), "without torch's magic number"),
    (b"plain text, not a checkpoint\n", "not a PyTorch checkpoint"),
])
def test_foreign_or_corrupt_files(tmp_path, content, match):
  path = tmp_path / "f.pt"
  path.write_bytes(content)
  with pytest.raises(CheckpointError, match=match) as e:
    read_torch(path)
  assert str(path) in str(e.value)


@pytest.mark.parametrize("name", ALL_FILES)
def test_mutated_fixtures_raise_only_checkpoint_error(tmp_path, name):
  """A few random byte changes (and cuts): the file reads, or CheckpointError names it; nothing else escapes."""
  rng = np.random.default_rng(0)
  data = (FIXTURES / name).read_bytes()
  path = tmp_path / name
  for _ in range(60):
    b = bytearray(data)
    for i in rng.integers(len(b), size=rng.integers(1, 4)):
      b[i] = rng.integers(256)
    path.write_bytes(bytes(b[: rng.integers(len(b))] if rng.random() < 0.2 else b))
    try:
      read_torch(path)
    except CheckpointError as e:
      assert str(path) in str(e)


def test_forged_memo_index_is_refused_before_unpickling(tmp_path):
  """A 20-byte pickle whose PUT index would make CPython's unpickler allocate a ~32 GiB memo."""
  path = tmp_path / "memo.pt"
  path.write_bytes(b"\x80\x02K\x01r\xff\xff\xff\xff.")  # PROTO 2, BININT1 1, LONG_BINPUT 2**32 - 1, STOP
  with pytest.raises(CheckpointError, match=r"corrupt header \(memo index 4294967295 in a pickle of 4 opcodes\)"):
    read_torch(path)


def test_zip_without_data_pkl_or_storage_entry(tmp_path):
  path = tmp_path / "a.zip"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("hello.txt", "hi")
  with pytest.raises(CheckpointError, match="exactly one <archive>/data.pkl entry; found none"):
    read_torch(path)
  path = write_zip(tmp_path / "b.pt", dumps([tensor("FloatStorage", "7", 2, 0, (2,), (1,))]), {})
  with pytest.raises(CheckpointError, match="storage '7' has no entry 'archive/data/7'"):
    read_torch(path)


@pytest.mark.parametrize("offset, size, stride, match", [
    (0, (3, 4), (4, 1), "reaches element 11 of storage '0', which has 10"),
    (8, (3,), (1,), "reaches element 10"),
    (0, (2, 2), (1,), r"size \(2, 2\) and stride \(1,\) differ in length"),
    (0, (2,), (-1,), "stride must be a tuple of non-negative ints"),
    (-1, (2,), (1,), "offset must be a non-negative int"),
])
@pytest.mark.parametrize("legacy", [False, True])
def test_bad_strides_cannot_read_outside_the_storage(tmp_path, offset, size, stride, match, legacy):
  payload = dumps(tensor("FloatStorage", "0", 10, offset, size, stride, legacy=legacy))
  data = np.arange(10, dtype=np.float32).tobytes()
  path = (write_legacy(tmp_path / "l.pt", payload, [("0", 10, data)]) if legacy
          else write_zip(tmp_path / "z.pt", payload, {"0": data}))
  with pytest.raises(CheckpointError, match=match):
    read_torch(path)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("wrap", ["bare", "legacy", "zip"])
def test_code_execution_is_refused(tmp_path, wrap):
  marker = tmp_path / "pwned"
  evil = pickle.dumps({"x": _Evil(marker)}, protocol=2)
  path = tmp_path / "evil.pt"
  if wrap == "bare":
    path.write_bytes(evil)
  elif wrap == "legacy":
    write_legacy(path, evil, [])
  else:
    write_zip(path, evil, {})
  with pytest.raises(CheckpointError, match=r"refusing to load arbitrary object (posix|os)\.system; ifjax reads "
                                            r"only tensors, dicts, lists and numbers"):
    read_torch(path)
  assert not marker.exists()


@pytest.mark.parametrize("obj, match", [
    (Call(G("builtins", "eval"), ("1+1",)), "builtins.eval"),
    (Call(G("__builtin__", "getattr"), (1, "real")), "builtins.getattr"),
    (Call(G("subprocess", "Popen"), (["true"],)), "subprocess.Popen"),
    (Call(G("__main__", "Net"), ()), r"__main__\.Net"),
    (Call(G("torch._tensor", "_rebuild_from_type_v2"), ()), "torch._tensor._rebuild_from_type_v2"),
    (Call(G("numpy", "dtype"), ("O", False, True)), "object dtype"),
    (Call(G("_codecs", "encode"), ("x", "rot13")), "only for latin-1"),
    (Pid(("module", "x")), "unsupported persistent id"),
    (Pid(("storage", G("torch", "float32"), 5, "cpu", 1)), "malformed storage id"),
    (Call(G("torch._utils", "_rebuild_tensor"), ([1, 2], 0, (2,), (1,))), "must be a persistent storage, got list"),
])
def test_disallowed_or_malformed_objects(tmp_path, obj, match):
  path = write_zip(tmp_path / "a.pt", dumps({"x": obj}), {})
  with pytest.raises(CheckpointError, match=match):
    read_torch(path)


# -- real checkpoints (shared data) -------------------------------------------------
REAL = {
    "resnet20-12fca82f.th": (97, 271_098, {"conv1.weight": (16, 3, 3, 3), "layer3.2.bn2.running_var": (64,),
                                           "linear.weight": (10, 64), "linear.bias": (10,)}),
    "resnet56-4bfd9763.th": (277, 857_082, {"conv1.weight": (16, 3, 3, 3), "layer3.8.conv2.weight": (64, 64, 3, 3),
                                            "linear.weight": (10, 64)}),
    "mnist_lenet5_clntrained.pt": (8, 648_226, {"conv1.weight": (32, 1, 3, 3), "conv2.weight": (64, 32, 3, 3),
                                                "linear1.weight": (200, 3136), "linear2.bias": (10,)}),
}


def _real(name: str) -> Path:
  path = data_dir() / "models" / name
  if not path.exists():
    pytest.skip(f"{path} not found (set IFJAX_DATA to the directory holding models/{name})")
  return path


@pytest.mark.parametrize("name", REAL)
def test_real_checkpoint(name):
  n, total, shapes = REAL[name]
  obj = read_torch(_real(name))
  sd = state_dict(obj)
  assert len(sd) == n and sum(v.size for v in sd.values()) == total
  assert {k: sd[k].shape for k in shapes} == shapes
  assert all(v.dtype == np.float32 for v in sd.values())
  if name.startswith("resnet20"):
    assert abs(obj["best_prec1"] - 91.78) < 1e-4 and next(iter(obj["state_dict"])) == "module.conv1.weight"
  if name.startswith("mnist"):
    assert isinstance(obj, collections.OrderedDict)


@pytest.mark.parametrize("name", REAL)
def test_real_checkpoint_matches_torch_load(name):
  path = _real(name)
  torch = pytest.importorskip("torch")
  _assert_same_as_torch(read_torch(path), torch.load(path, map_location="cpu", weights_only=True), torch)


# -- state_dict ---------------------------------------------------------------------
def test_state_dict_selection_and_prefixes():
  a = np.zeros(2)
  for key in ("state_dict", "model_state_dict", "model", "net"):
    assert list(state_dict({key: {"module.x": a, "module.y": a}, "epoch": 1})) == ["x", "y"]
  assert list(state_dict({"module.x": a, "y": a, "lr": 0.1})) == ["module.x", "y"]  # not all carry it
  assert list(state_dict({"module.x": a}, prefix_strip=())) == ["module.x"]
  assert list(state_dict({"m.module.x": a}, prefix_strip=("m.", "module."))) == ["x"]
  assert list(state_dict({"model": "resnet", "x": a})) == ["x"]  # "model" without arrays is not the state dict


def test_state_dict_errors():
  with pytest.raises(CheckpointError, match="expected a dict of tensors, got list"):
    state_dict([np.zeros(2)])
  with pytest.raises(CheckpointError, match=r"no tensors found in the checkpoint \(top-level keys: 'epoch', 'lr'\)"):
    state_dict({"epoch": 3, "lr": 0.1})


# -- load_into ----------------------------------------------------------------------
class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, name="bn")(x)
    return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


MAPPING = {
    "params/conv/kernel": ("conv.weight", "conv"), "params/conv/bias": ("conv.bias", "vector"),
    "params/bn/scale": ("bn.weight", "vector"), "params/bn/bias": ("bn.bias", "vector"),
    "batch_stats/bn/mean": ("bn.running_mean", "vector"), "batch_stats/bn/var": ("bn.running_var", "vector"),
    "params/fc/kernel": ("fc.weight", "dense"), "params/fc/bias": ("fc.bias", "vector"),
}


def _torch_forward(sd, x_nchw):
  """The same network in NumPy on torch layouts (NCHW, OIHW, (out, in))."""
  win = np.lib.stride_tricks.sliding_window_view(x_nchw, (3, 3), axis=(2, 3))  # (N, C, H', W', 3, 3)
  y = np.einsum("nchwij,ocij->nohw", win, sd["conv.weight"]) + sd["conv.bias"][:, None, None]
  y = (y - sd["bn.running_mean"][:, None, None]) / np.sqrt(sd["bn.running_var"][:, None, None] + 1e-5)
  y = y * sd["bn.weight"][:, None, None] + sd["bn.bias"][:, None, None]
  return y.mean(axis=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]


def _tiny_variables(concrete: bool):
  """_Tiny's variables as zeros (``concrete``) or as ShapeDtypeStructs (from eval_shape, no init cost)."""
  shapes = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.zeros((1, 5, 5, 2)))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes) if concrete else shapes


def test_load_into_matches_the_torch_network():
  variables = _tiny_variables(concrete=True)
  before = jax.tree.map(np.array, variables)
  sd = state_dict(read_torch(FIXTURES / "checkpoint_zip.th"))
  loaded = load_into(variables, sd, MAPPING)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  assert loaded is not variables and loaded["params"] is not variables["params"]
  jax.tree.map(np.testing.assert_array_equal, variables, before)  # input untouched
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    assert isinstance(a, jax.Array) and a.dtype == b.dtype and a.shape == b.shape
  np.testing.assert_array_equal(loaded["params"]["conv"]["kernel"], sd["conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], sd["fc.weight"].T)
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 2)).astype(np.float32)
  out = jax.jit(_Tiny().apply)(loaded, x)
  np.testing.assert_allclose(out, _torch_forward(sd, x.transpose(0, 3, 1, 2)), rtol=1e-5, atol=1e-5)


def test_load_into_accepts_shape_dtype_templates():
  sd = state_dict(read_torch(FIXTURES / "checkpoint_legacy.th"))
  loaded = load_into(_tiny_variables(concrete=False), sd, MAPPING)
  assert jax.tree.structure(loaded) == jax.tree.structure(_tiny_variables(concrete=True))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(loaded))


def test_load_into_casts_to_template_dtype_and_depthwise_conv():
  variables = {"params": {"dw": {"kernel": jnp.zeros((3, 3, 1, 4))}, "b": {"bias": np.zeros(4, np.float32)}}}
  w = np.arange(36, dtype=np.float64).reshape(4, 1, 3, 3)
  tensors = {"dw.weight": w, "b.bias": np.ones(4, ml_dtypes.bfloat16)}
  mapping = {"params/dw/kernel": ("dw.weight", "conv"), "params/b/bias": ("b.bias", "vector")}
  out = load_into(variables, tensors, mapping)
  assert out["params"]["dw"]["kernel"].dtype == jnp.float32 and out["params"]["b"]["bias"].dtype == jnp.float32
  for c in range(4):
    np.testing.assert_array_equal(out["params"]["dw"]["kernel"][:, :, 0, c], w[c, 0])


def test_load_into_lists_every_problem():
  variables = _tiny_variables(concrete=False)
  sd = state_dict(read_torch(FIXTURES / "checkpoint_legacy.th"))
  sd["conv.weight"] = np.zeros((8, 2, 3, 3), np.float32)
  sd["fc.bias"] = np.zeros((3, 1), np.float32)
  del sd["bn.bias"]
  sd["extra.weight"] = np.zeros(2)
  sd["bn.num_batches_tracked"] = np.array(3)
  mapping = {k: v for k, v in MAPPING.items() if k != "params/conv/bias"}
  mapping["params/head/kernel"] = ("head.weight", "dense")
  mapping["batch_stats/bn/var"] = ("bn.running_var", "dense")
  with pytest.raises(CheckpointMismatchError) as e:
    load_into(variables, sd, mapping)
  msg = str(e.value)
  assert "1 variable(s) without a mapping entry:\n    params/conv/bias" in msg
  assert "1 mapping path(s) not in the variables:\n    params/head/kernel" in msg
  assert "1 key(s) missing from the checkpoint:\n    'bn.bias' (for params/bn/bias)" in msg
  assert "2 unexpected key(s) in the checkpoint:\n    'conv.bias'\n    'extra.weight'" in msg
  assert "num_batches_tracked" not in msg
  assert ("params/conv/kernel <- 'conv.weight': checkpoint (8, 2, 3, 3) is (3, 3, 2, 8) as 'conv'; "
          "variables need (3, 3, 2, 4) (torch (4, 2, 3, 3))") in msg
  assert "params/fc/bias <- 'fc.bias': checkpoint (3, 1) is (3, 1) as 'vector'; variables need (3,)" in msg
  assert "batch_stats/bn/var <- 'bn.running_var': checkpoint (4,) has the wrong rank for 'dense'" in msg
  assert e.value.unmapped == ["params/conv/bias"] and e.value.unknown == ["params/head/kernel"]
  assert e.value.missing == ["bn.bias"] and e.value.unexpected == ["conv.bias", "extra.weight"]
  assert sorted(e.value.mismatched) == [("batch_stats/bn/var", "bn.running_var", (4,), (4,)),
                                        ("params/conv/kernel", "conv.weight", (8, 2, 3, 3), (3, 3, 2, 4)),
                                        ("params/fc/bias", "fc.bias", (3, 1), (3,))]
  assert isinstance(e.value, CheckpointError) and isinstance(e.value, ValueError)


def test_load_into_truncates_long_lists_and_checks_the_mapping():
  variables = {"params": {"w": np.zeros(2, np.float32)}}
  tensors = {"w": np.zeros(2), **{f"extra{i:02d}": np.zeros(1) for i in range(30)}}
  with pytest.raises(CheckpointMismatchError, match=r"30 unexpected key\(s\)") as e:
    load_into(variables, tensors, {"params/w": ("w", "vector")})
  assert "'extra19'" in str(e.value) and "'extra20'" not in str(e.value) and "... and 10 more" in str(e.value)
  assert len(e.value.unexpected) == 30
  with pytest.raises(ValueError, match="mapping\\['params/w'\\] has layout 'linear'; expected one of 'conv'"):
    load_into(variables, tensors, {"params/w": ("w", "linear")})
  with pytest.raises(ValueError, match="must be \\(torch key, layout\\)"):
    load_into(variables, tensors, {"params/w": "w"})


@pytest.mark.parametrize("legacy", [False, True])
def test_overlapping_tensors_are_capped_for_the_whole_file(tmp_path, legacy, monkeypatch):
  """Four stride-0 tensors each under the per-tensor cap must not add up past it (a 546-byte file once made
  read_torch allocate 1 GiB)."""
  import ifjax._checkpoint as ck

  monkeypatch.setattr(ck, "_MAX_EXPANSION", 1000)
  data = np.arange(2, dtype=np.float32).tobytes()

  def write(count):
    payload = dumps({f"t{i}": tensor("FloatStorage", "0", 2, 0, (400,), (0,), legacy=legacy) for i in range(count)})
    return (write_legacy(tmp_path / f"l{count}.pt", payload, [("0", 2, data)]) if legacy
            else write_zip(tmp_path / f"z{count}.pt", payload, {"0": data}))

  ok = read_torch(write(2))  # 800 expanded elements: under the cap
  assert [a.shape for a in ok.values()] == [(400,), (400,)] and (ok["t1"] == 0).all()
  with pytest.raises(CheckpointError, match=r"bringing the overlapping tensors of this file to 1200 elements; they "
                                            r"are limited to 1000 in total"):
    read_torch(write(4))
  assert len(read_torch(write(2))) == 2  # the count starts afresh for every file
