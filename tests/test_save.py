"""ifjax.save / ifjax.restore and the write_tree / read_tree / latest helpers under them.

Round trips are checked bit for bit (values and dtypes); every error test corrupts
one thing in a real checkpoint and expects a CheckpointError naming its path.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import ifjax
from ifjax._save import latest, read_tree, write_tree


class TrainState(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: Any
  step: Any


def assert_bit_exact(a, b):
  """Same tree structure, and every leaf has the same type, dtype and bytes."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert type(x) is type(y), (type(x), type(y))
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      assert x.dtype == y.dtype and np.shape(x) == np.shape(y)
      assert np.array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))
    else:
      assert x == y


def train_state(params, batch_stats, step=1):
  """An sgd-with-momentum state after one update (non-zero momentum buffers)."""
  opt = optax.sgd(0.1, momentum=0.9)
  opt_state = opt.init(params)
  grads = jax.tree.map(lambda p: 0.01 * p + 0.001, params)
  updates, opt_state = opt.update(grads, opt_state, params)
  return TrainState(optax.apply_updates(params, updates), batch_stats, opt_state, jnp.asarray(step, jnp.int32))


@pytest.fixture(scope="module")
def resnet():
  """A ResNet20 pruned 50% in two internal groups and one stream (segment) group, its widths and train state."""
  module, spec = ifjax.models.get("resnet20")
  v = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  pl = ifjax.plan(v, spec, 0.5, groups=["layer1_0/conv1", "layer3_2/conv1", "stream2b"])
  small = ifjax.apply_plan(v, spec, pl)
  w = ifjax.widths(v, spec, pl)
  small_module, small_spec = ifjax.models.get("resnet20", widths=w)
  return small_module, small_spec, small, w, train_state(small["params"], small["batch_stats"])


@pytest.fixture(scope="module")
def mlp():
  module, spec = ifjax.models.get("mlp")
  return spec, module.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))


@pytest.fixture
def mlp_ckpt(tmp_path, mlp):
  """A fresh MLP checkpoint with a train state, to be damaged by a test."""
  spec, v = mlp
  return ifjax.save(tmp_path / "mlp", v, spec, ifjax.widths(v, spec), state=train_state(v["params"], {}))


def edit_manifest(path: Path, fn):
  file = path / "meta" / "ifjax.json"
  manifest = json.loads(file.read_text())
  fn(manifest)
  file.write_text(json.dumps(manifest))


def raises_with_path(path, match):
  """pytest.raises for a CheckpointError whose message names ``path`` (absolute) and matches ``match``."""
  return pytest.raises(ifjax.CheckpointError, match=rf"(?s)(?=.*{re.escape(str(Path(path).absolute()))}).*{match}")


# -- round trips ----------------------------------------------------------------------------------
def test_pruned_resnet20_round_trip_is_bit_exact(tmp_path, resnet):
  small_module, small_spec, small, w, state = resnet
  assert w["stream2b"] < 32 and w["layer1_0/conv1"] == 8  # really pruned, at a stream (segment) group too
  path = ifjax.save(tmp_path / "pruned", small, small_spec, w, state=state)
  variables, spec, widths, raw_state = ifjax.restore(path)
  assert_bit_exact(variables, small)
  assert spec == small_spec and widths == w
  assert_bit_exact(raw_state, flax.serialization.to_state_dict(state))
  assert np.any(np.asarray(raw_state["opt_state"]["0"]["trace"]["fc"]["kernel"]) != 0)
  x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
  rebuilt = ifjax.models.get("resnet20", widths=widths)[0]
  np.testing.assert_array_equal(rebuilt.apply(variables, x), small_module.apply(small, x))


def test_state_template_restores_namedtuples(tmp_path, resnet):
  _, small_spec, small, w, state = resnet
  path = ifjax.save(tmp_path / "pruned", small, small_spec, w, state=state)
  template = train_state(small["params"], small["batch_stats"], step=0)
  _, _, _, restored = ifjax.restore(path, state_template=template)
  assert isinstance(restored, TrainState)
  assert isinstance(restored.opt_state, tuple) and isinstance(restored.opt_state[0], optax.TraceState)
  assert isinstance(restored.opt_state[1], optax.EmptyState)
  assert_bit_exact(restored, state)
  assert int(restored.step) == 1


def test_mlp_without_widths_or_state(tmp_path, mlp):
  spec, v = mlp
  variables, spec2, widths, state = ifjax.restore(ifjax.save(tmp_path / "m", v, spec))
  assert_bit_exact(variables, v)
  assert spec2 == spec and widths is None and state is None


def test_write_tree_leaf_kinds_and_dtypes_are_bit_exact(tmp_path):
  rng = np.random.default_rng(0)
  tree = {
      "f32": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
      "bf16": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
      "np_bf16": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16),
      "f16": rng.normal(size=(4,)).astype(np.float16),
      "i8": np.arange(-5, 5, dtype=np.int8),
      "i32": jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
      "i64": np.array([2**40, -1], np.int64),
      "u8": np.arange(4, dtype=np.uint8),
      "bool": np.array([True, False]),
      "nan": np.array([np.nan, -0.0, np.inf], np.float32),
      "step": jnp.asarray(41, jnp.int32),
      "np_step": np.int64(7),
      "py_step": 12, "py_lr": 0.1, "py_flag": True,
      "empty_array": np.zeros((0, 3), np.float32),
      "key": jax.random.key(3),
      "none": None, "empty": {},
      "seq": [np.ones(2, np.float32), (np.zeros(1, np.int32),)],
  }
  path = write_tree(tmp_path / "t", tree, {"epoch": 3, "note": "x"})
  raw, meta = read_tree(path)
  assert meta == {"epoch": 3, "note": "x"}
  assert set(raw["seq"]) == {"0", "1"} and set(raw["seq"]["1"]) == {"0"}  # sequences come back as dicts
  restored, _ = read_tree(path, template=tree)
  key, key2 = restored.pop("key"), tree.pop("key")
  assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(key2))
  assert isinstance(restored["seq"], list) and isinstance(restored["seq"][1], tuple)
  assert restored["none"] is None and restored["empty"] == {}
  assert_bit_exact(restored, tree)


# -- latest ---------------------------------------------------------------------------------------
def test_latest_ignores_temporary_and_incomplete_checkpoints(tmp_path):
  assert latest(tmp_path / "nowhere", "ck") is None
  assert latest(tmp_path, "ck") is None
  for step in (2, 10):
    write_tree(tmp_path / f"ck_{step}", {"w": np.full(3, step)}, {"step": step})
  write_tree(tmp_path / "other_50", {"w": np.zeros(1)}, {})
  shutil.copytree(tmp_path / "ck_10", tmp_path / "ck_30.orbax-checkpoint-tmp")  # an unfinished orbax save
  shutil.copytree(tmp_path / "ck_10", tmp_path / "ck_20")
  (tmp_path / "ck_20" / "meta" / "ifjax.json").unlink()  # no manifest: incomplete
  (tmp_path / "ck_40").mkdir()
  (tmp_path / "ck_x").mkdir()
  assert latest(tmp_path, "ck") == tmp_path / "ck_10"  # numeric, not lexicographic, order
  assert read_tree(latest(tmp_path, "ck"))[1] == {"step": 10}
  assert latest(tmp_path, "other") == tmp_path / "other_50"


# -- errors ---------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
  with raises_with_path(tmp_path / "gone", "no checkpoint directory"):
    ifjax.restore(tmp_path / "gone")
  (tmp_path / "gone.orbax-checkpoint-tmp").mkdir()
  with raises_with_path(tmp_path / "gone", "unfinished save"):
    read_tree(tmp_path / "gone")


def test_directory_that_is_not_a_checkpoint(tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "weights.npz").write_bytes(b"not a checkpoint")
  with raises_with_path(tmp_path / "d", "not an ifjax checkpoint"):
    ifjax.restore(tmp_path / "d")


# orbax's reader threads may report "Event loop is closed" after the failed read; that is orbax's noise, not ours
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete", "overwrite"])
def test_damaged_array_file(mlp_ckpt, damage):
  data = max((p for p in (mlp_ckpt / "arrays").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)  # the big chunk file holding the first dense kernel
  blob = bytearray(data.read_bytes())
  if damage == "truncate":
    data.write_bytes(blob[:len(blob) // 2])
  elif damage == "delete":
    data.unlink()
  else:
    blob[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)
    data.write_bytes(blob)
  with raises_with_path(mlp_ckpt, "corrupt"):
    ifjax.restore(mlp_ckpt)


def test_corrupt_manifest_json(mlp_ckpt):
  file = mlp_ckpt / "meta" / "ifjax.json"
  file.write_text(file.read_text()[:100])
  with raises_with_path(mlp_ckpt, "ifjax.json is corrupt"):
    ifjax.restore(mlp_ckpt)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["leaves"].pop(), "malformed"),
    (lambda m: m["leaves"][0].update(dtype="float77"), "malformed"),
    (lambda m: m["leaves"][0].pop("crc32"), "malformed"),
    (lambda m: m["structure"]["variables"]["params"]["dense0"].update(bias="0"), "malformed.*where a leaf index"),
    (lambda m: m["leaves"][0].update(shape=[3]), "manifest says"),
    (lambda m: m.update(format="other"), "not an ifjax manifest"),
    (lambda m: m.update(version=99), "format version 99"),
])
def test_malformed_manifest(mlp_ckpt, edit, match):
  edit_manifest(mlp_ckpt, edit)
  with raises_with_path(mlp_ckpt, match):
    ifjax.restore(mlp_ckpt)


def test_saved_spec_that_does_not_match(mlp_ckpt):
  def wrong_member(m):
    m["meta"]["ifjax.save"]["spec"]["groups"][0]["producers"][0] = ["params/dense1/kernel", 1, 0]

  edit_manifest(mlp_ckpt, wrong_member)
  with raises_with_path(mlp_ckpt, "spec or widths do not match.*dense"):
    ifjax.restore(mlp_ckpt)


def test_saved_width_that_does_not_match(mlp_ckpt):
  edit_manifest(mlp_ckpt, lambda m: m["meta"]["ifjax.save"]["widths"].update(dense1=63))
  with raises_with_path(mlp_ckpt, "'dense1': width 63 but the variables have 64"):
    ifjax.restore(mlp_ckpt)


def test_mismatched_state_template(mlp_ckpt, mlp):
  spec, v = mlp
  other_optimizer = TrainState(v["params"], {}, optax.adam(1e-3).init(v["params"]), jnp.int32(0))
  with raises_with_path(mlp_ckpt, "state_template does not match.*missing from the checkpoint"):
    ifjax.restore(mlp_ckpt, state_template=other_optimizer)
  wider = jax.tree.map(lambda p: jnp.zeros((p.shape[0] + 1, *p.shape[1:])), v["params"])
  with raises_with_path(mlp_ckpt, r"params/dense0/bias' is \(128,\) in the checkpoint but \(129,\)"):
    ifjax.restore(mlp_ckpt, state_template=train_state(wider, {}))
  with raises_with_path(mlp_ckpt, "does not match"):
    read_tree(mlp_ckpt, template={"variables": v})


def test_restore_of_a_write_tree_checkpoint(tmp_path):
  path = write_tree(tmp_path / "t", {"w": np.ones(2)}, {"step": 1})
  with raises_with_path(path, "not a model checkpoint"):
    ifjax.restore(path)


def test_save_rejects_bad_input_before_writing(tmp_path, resnet, mlp):
  _, small_spec, small, w, _ = resnet
  full_spec = ifjax.models.get("resnet20")[1]
  with pytest.raises(ValueError, match="spec does not describe the variables.*widths=widths"):
    ifjax.save(tmp_path / "a", small, full_spec, w)
  with pytest.raises(ValueError, match="'stream2b': width 5 but the variables have 4"):
    ifjax.save(tmp_path / "a", small, small_spec, {**w, "stream2b": 5})
  with pytest.raises(ValueError, match="unknown group 'conv9'"):
    ifjax.save(tmp_path / "a", small, small_spec, {"conv9": 3})
  with pytest.raises(TypeError, match="leaf 'state/name' is a str"):
    ifjax.save(tmp_path / "a", small, small_spec, state={"name": "resnet"})
  with pytest.raises(TypeError, match="JSON"):
    write_tree(tmp_path / "a", {"w": np.ones(1)}, {"when": object()})
  assert not (tmp_path / "a").exists()
  spec, v = mlp
  ifjax.save(tmp_path / "m", v, spec)
  with pytest.raises(FileExistsError, match="already exists"):
    ifjax.save(tmp_path / "m", v, spec)


def test_import_ifjax_does_not_import_orbax():
  code = "import ifjax, sys; assert not any(m.startswith('orbax') for m in sys.modules), 'orbax imported'"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
