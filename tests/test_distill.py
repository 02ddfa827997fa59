"""ifjax.finetune.distill: label-free distillation of a pruned student toward its dense teacher.

The 4-device check runs this file as a script in a subprocess (XLA's CPU device count is fixed when JAX starts):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/test_distill.py mesh OUT.npz
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ifjax
from ifjax import finetune, train

WIDTHS = {"conv0": 8, "conv1": 8, "conv2": 16}


def setup():
  """A dense random digits CNN (teacher, sharpened logits), its Intra-Fusion at 0.5 with unfolded BN statistics
  (student), 256 training and 128 held-out random 8x8 inputs."""
  module, spec = ifjax.models.get("digits_cnn", widths=WIDTHS)
  teacher = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  teacher = {**teacher, "params": {**teacher["params"], "fc": {**teacher["params"]["fc"],
                                                               "kernel": 4 * teacher["params"]["fc"]["kernel"]}}}
  plan = ifjax.plan(teacher, spec, 0.5)
  student = ifjax.unfold_batchnorm(ifjax.apply_plan(teacher, spec, plan), teacher, spec, plan)
  student_module, _ = ifjax.models.get("digits_cnn", widths=ifjax.widths(student, spec))
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(256, 8, 8, 1)).astype(np.float32)
  held_out = rng.normal(size=(128, 8, 8, 1)).astype(np.float32)
  return module, teacher, student_module, student, spec, inputs, held_out


@pytest.fixture(scope="module")
def tiny():
  return setup()


def _leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _equal(a, b) -> bool:
  la, lb = _leaves(a), _leaves(b)
  return la.keys() == lb.keys() and all(np.array_equal(la[k], lb[k]) for k in la)


def test_distill_lowers_the_kl_to_the_teacher(tiny):
  module, teacher, _, _, spec, inputs, held_out = tiny
  pruned = ifjax.prune(teacher, spec, 0.5)  # default pruning, BNs folded: eval-mode student, params only
  student_module, _ = ifjax.models.get("digits_cnn", widths=ifjax.widths(pruned, spec))
  before = finetune.kl_to_teacher(student_module, pruned, module, teacher, held_out)
  r = finetune.distill(student_module, pruned, module, teacher, inputs, steps=60, optimizer=optax.adam(3e-3),
                       batch_size=32, temperature=2.0)
  after = finetune.kl_to_teacher(student_module, r.variables, module, teacher, held_out)
  assert before > 0.05 and after < 0.5 * before, (before, after)
  assert [h["step"] for h in r.history] == list(range(10, 61, 10))
  assert set(r.history[0]) == {"step", "kl", "loss"}
  assert r.history[-1]["kl"] < r.history[0]["kl"]
  assert np.isclose(r.history[0]["loss"], 4 * r.history[0]["kl"])  # T^2 KL at T = 2
  assert r.images_seen == 60 * 32 and r.seconds > 0
  assert _equal(r.variables["batch_stats"], pruned["batch_stats"])  # eval mode: the folded BNs stay folded


def test_resume_is_bit_exact_and_refuses_other_settings(tiny, tmp_path):
  module, teacher, student_module, student, _, inputs, _ = tiny
  opt, aug = optax.adam(1e-3), train.flip_crop(2)
  kw = {"steps": 10, "optimizer": opt, "batch_size": 32, "augment": aug, "train_bn": True, "features": ("bn1", "bn2"),
        "feature_weight": 10.0, "log_every": 2, "checkpoint_every": 5, "progress": False}
  args = (student_module, student, module, teacher, inputs)
  whole = finetune.distill(*args, checkpoint_dir=tmp_path / "whole", **kw)
  first = finetune.distill(*args, checkpoint_dir=tmp_path / "split", **{**kw, "steps": 5})
  assert first.images_seen == 5 * 32 and not _equal(first.variables, whole.variables)
  resumed = finetune.distill(*args, checkpoint_dir=tmp_path / "split", **kw)  # 8 batches per pass: crosses one
  assert _equal(resumed.variables, whole.variables)
  assert resumed.history == whole.history and resumed.images_seen == 10 * 32
  assert [h["step"] for h in whole.history] == [2, 4, 5, 6, 8, 10] and "feature" in whole.history[0]
  plain = finetune.distill(*args, **kw)  # no checkpoints: the same training
  assert _equal(plain.variables, whole.variables)
  assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["step_10", "step_5"]
  with pytest.raises(train.TrainingError, match=r"steps=3, but checkpoint_dir already holds step 10"):
    finetune.distill(*args, checkpoint_dir=tmp_path / "split", **{**kw, "steps": 3})
  with pytest.raises(train.TrainingError, match="temperature"):
    finetune.distill(*args, checkpoint_dir=tmp_path / "split", **{**kw, "temperature": 3.0})
  with pytest.raises(train.TrainingError, match="another optimizer"):
    finetune.distill(*args, checkpoint_dir=tmp_path / "split", **{**kw, "optimizer": optax.adam(1e-2)})


def test_train_bn_updates_batch_stats_only_when_asked(tiny):
  module, teacher, student_module, student, _, inputs, _ = tiny
  kw = {"steps": 3, "optimizer": optax.sgd(0.05), "batch_size": 32, "progress": False}
  frozen = finetune.distill(student_module, student, module, teacher, inputs, **kw)
  assert _equal(frozen.variables["batch_stats"], student["batch_stats"])
  assert not _equal(frozen.variables["params"], student["params"])
  moving = finetune.distill(student_module, student, module, teacher, inputs, train_bn=True, **kw)
  before, after = _leaves(student["batch_stats"]), _leaves(moving.variables["batch_stats"])
  assert all(not np.array_equal(before[k], after[k]) for k in before)


def test_gram_loss_ignores_the_channel_basis(rng):
  f = rng.normal(size=(6, 4, 4, 8)).astype(np.float32)
  q, _ = np.linalg.qr(rng.normal(size=(12, 8)))  # (12, 8), orthonormal columns: 8 channels -> 12, Gram kept
  g = f @ q.T.astype(np.float32)
  assert float(finetune.gram_loss(f, g)) < 1e-10
  assert float(finetune.gram_loss(f, rng.normal(size=(6, 4, 4, 3)).astype(np.float32))) > 1e-3


def test_bad_inputs_name_the_argument(tiny):
  module, teacher, student_module, student, _, inputs, _ = tiny
  args = (student_module, student, module, teacher)

  def run(x=inputs, **kw):
    finetune.distill(*args, x, **{"steps": 1, "batch_size": 32, "progress": False, **kw})

  with pytest.raises(ValueError, match="inputs is empty"):
    run(inputs[:0])
  with pytest.raises(TypeError, match="inputs.*no labels.*images alone"):
    run((inputs, np.zeros(len(inputs), np.int32)))
  bad = inputs.copy()
  bad[7, 1, 2, 0] = np.nan
  with pytest.raises(ValueError, match=r"inputs hold NaN or inf \(first in example 7\)"):
    run(bad)
  with pytest.raises(ValueError, match=r"inputs must be images \(N, H, W, C\).*\(8, 8, 1\)"):
    run(inputs[0])
  with pytest.raises(ValueError, match="inputs must be preprocessed floating-point"):
    run((inputs * 100).astype(np.uint8))
  for steps in (0, -2):
    with pytest.raises(ValueError, match="steps must be >= 1"):
      run(steps=steps)
  for steps in (1.5, True, "3"):
    with pytest.raises(TypeError, match="steps must be an int"):
      run(steps=steps)
  run(steps=np.int64(1))  # a NumPy integer is a step count
  with pytest.raises(ValueError, match="batch_size=512, but inputs holds only 256"):
    run(batch_size=512)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    run(temperature=0.0)
  with pytest.raises(ValueError, match="feature_weight=1.0 needs features"):
    run(feature_weight=1.0)
  with pytest.raises(ValueError, match="features: no module 'bn9'"):
    run(features=["bn1", "bn9"])
  with pytest.raises(TypeError, match="features must be a sequence of module paths"):
    run(features=5)
  with pytest.raises(ValueError, match="differ"):
    other, _ = ifjax.models.get("digits_cnn", num_classes=7, widths=WIDTHS)
    finetune.distill(student_module, student, other, other.init(jax.random.key(0), inputs[:1]), inputs, steps=1,
                     batch_size=32, progress=False)
  with pytest.raises(TypeError, match="optimizer must be"):
    run(optimizer="adam")


def test_mesh_of_four_devices_equals_one_device(tmp_path):
  out = tmp_path / "mesh.npz"
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  proc = subprocess.run([sys.executable, __file__, "mesh", str(out)], env=env, capture_output=True, text=True,
                        check=False, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  results = np.load(out)
  assert int(results["devices"]) == 4
  keys = [k for k in results.files if k.startswith("one")]
  assert any("batch_stats" in k for k in keys) and any("params" in k for k in keys)
  for k in keys:
    np.testing.assert_allclose(results["four" + k[3:]], results[k], rtol=2e-5, atol=2e-6, err_msg=k)


def _mesh_script(out: str):
  module, teacher, student_module, student, _, inputs, _ = setup()
  kw = {"steps": 3, "optimizer": optax.sgd(0.05, momentum=0.9), "batch_size": 32, "augment": train.flip_crop(2),
        "train_bn": True, "features": ["bn1"], "feature_weight": 10.0, "temperature": 2.0, "progress": False}
  one = finetune.distill(student_module, student, module, teacher, inputs, **kw)
  four = finetune.distill(student_module, student, module, teacher, inputs, mesh=train.make_mesh({"data": 4}), **kw)
  assert len(one.history) == len(four.history) == 1
  results = {"devices": np.asarray(len(jax.devices())), "one_kl": np.asarray(one.history[0]["kl"]),
             "four_kl": np.asarray(four.history[0]["kl"])}
  for name, r in (("one", one), ("four", four)):
    results.update({name + k: v for k, v in _leaves(r.variables).items()})
  np.savez(out, **results)


if __name__ == "__main__":
  if sys.argv[1] == "mesh":
    _mesh_script(sys.argv[2])
