"""ifjax.finetune: iterative widths, one-shot equals intra_fuse / prune, iterative pruning with fine-tuning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ifjax
from ifjax import finetune
from ifjax._repair import _batch_statistics


@given(st.integers(2, 600), st.floats(0.0, 0.95), st.integers(1, 6))
@settings(max_examples=200, deadline=None)
def test_relative_ratios_land_on_the_step_widths(n, r, steps):
  targets = finetune.step_widths({"g": n}, {"g": r}, steps)
  assert targets[-1]["g"] == ifjax.kept_count(n, r)  # the last step is exactly the one-shot width
  current = n
  for t in targets:
    rel = finetune.relative_ratios({"g": current}, t)
    if t["g"] < current:
      assert 0 <= rel["g"] < 1 and ifjax.kept_count(current, rel["g"]) == t["g"]
      current = t["g"]
    else:
      assert rel == {}
  assert current == ifjax.kept_count(n, r)


def _clusters(n=256, d=64, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, d)).astype(np.float32)
  labels = rng.integers(0, classes, n).astype(np.int32)
  return (centers[labels] + 0.7 * rng.normal(size=(n, d))).astype(np.float32), labels


@pytest.fixture(scope="module")
def mlp():
  module, spec = ifjax.models.get("mlp")
  data = _clusters()
  variables, _ = ifjax.train.fit(module, module.init(jax.random.key(0), jnp.zeros((1, 64))), data, epochs=3,
                                 optimizer=optax.sgd(0.05, momentum=0.9), batch_size=32, progress=False)
  return module, spec, variables, data


def _equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_one_shot_without_epochs_is_intra_fuse_or_prune(mlp):
  module, spec, variables, data = mlp
  r = finetune.prune_and_finetune("mlp", variables, 0.5, data, method="if", progress=False)
  assert _equal(r.variables, ifjax.intra_fuse(variables, spec, 0.5))
  assert r.widths == {"dense0": 64, "dense1": 32}
  d = finetune.prune_and_finetune("mlp", variables, 0.5, data, method="default", progress=False)
  assert _equal(d.variables, ifjax.prune(variables, spec, 0.5))
  b = finetune.prune_and_finetune("mlp", variables, 0.5, data, normalization="barycentric", progress=False)
  assert _equal(b.variables, ifjax.intra_fuse(variables, spec, 0.5, normalization="barycentric"))


def test_iterative_pruning_with_fine_tuning(mlp):
  module, spec, variables, data = mlp
  r = finetune.prune_and_finetune("mlp", variables, {"dense0": 0.75}, data, steps=3, epochs_per_step=1,
                                  finetune_epochs=1, eval_data=data, batch_size=32, progress=False,
                                  importance="taylor", taylor_batches=2)
  assert [h["widths"]["dense0"] for h in r.history] == [96, 64, 32]
  assert r.widths == {"dense0": 32, "dense1": 64}
  assert [len(h["epochs"]) for h in r.history] == [1, 1, 2]
  assert all(0 <= h["accuracy_pruned"] <= 1 for h in r.history)
  acc = ifjax.train.evaluate(r.module, r.variables, data)
  assert acc == r.history[-1]["epochs"][-1]["eval_accuracy"]
  assert acc > 0.5  # 10 separable clusters: fine-tuning keeps the pruned MLP far above chance
  with pytest.raises(ValueError, match="method"):
    finetune.prune_and_finetune("mlp", variables, 0.5, data, method="random")
  with pytest.raises(ValueError, match="steps"):
    finetune.prune_and_finetune("mlp", variables, 0.5, data, steps=0)
  with pytest.raises(ValueError, match="unknown zoo model"):
    finetune.prune_and_finetune("mlp9", variables, 0.5, data)


def test_recalibrate_restores_batchnorm_statistics():
  """After apply_plan the BNs are folded identities; recalibrate=... gives them real statistics again, so the
  pruned model agrees with its own train-mode BN on the calibration data."""
  module, spec = ifjax.models.get("resnet20")
  rng = np.random.default_rng(0)
  data = (rng.normal(size=(64, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 64).astype(np.int32))
  variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  plain = finetune.prune_and_finetune("resnet20", variables, {"layer2_0/conv1": 0.5}, data, progress=False)
  fixed = finetune.prune_and_finetune("resnet20", variables, {"layer2_0/conv1": 0.5}, data, recalibrate=2,
                                      batch_size=32, progress=False)
  assert plain.widths == fixed.widths and fixed.widths["layer2_0/conv1"] == 16
  mean_plain = np.asarray(plain.variables["batch_stats"]["layer2_0"]["bn1"]["mean"])
  mean_fixed = np.asarray(fixed.variables["batch_stats"]["layer2_0"]["bn1"]["mean"])
  assert np.allclose(mean_plain, 0) and not np.allclose(mean_fixed, 0)


def test_unfold_batchnorm_keeps_the_function_and_matches_training_mode():
  """unfold_batchnorm changes nothing in eval mode, and in training mode (batch statistics) the unfolded model
  is closer to its eval-mode self than the folded one; with nothing pruned, train-mode BN on the data the
  statistics came from reproduces the original train-mode outputs."""
  module, spec = ifjax.models.get("resnet20")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 32, 32, 3)).astype(np.float32)
  variables = module.init(jax.random.key(0), x[:1])
  stats = _batch_statistics(module.apply, variables, [x])  # the running statistics are those of x
  flat = {**ifjax._spec.flatten(variables), **stats}
  variables = ifjax._spec.unflatten(flat)
  train_mode = lambda m, v: m.apply(v, x, train=True, mutable=["batch_stats"])[0]
  for ratio in (0.0, 0.3):
    pl = ifjax.plan(variables, spec, ratio, groups=[g.name for g in spec.groups if not g.name.startswith("stream")])
    folded = ifjax.apply_plan(variables, spec, pl)
    unfolded = ifjax.unfold_batchnorm(folded, variables, spec, pl)
    small, _ = ifjax.models.get("resnet20", widths=ifjax.widths(folded, spec))
    a, b = small.apply(folded, x), small.apply(unfolded, x)
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(a))  # eval mode: the same function
    gap = lambda v: float(np.mean(np.abs(train_mode(small, v) - small.apply(v, x))))
    assert gap(unfolded) < (0.01 if ratio == 0 else 0.6) * gap(folded)  # random init: 0.29 vs 0.75 at 0.3
    if ratio == 0.0:
      ref = train_mode(module, variables)
      assert np.max(np.abs(train_mode(small, unfolded) - ref)) <= 1e-3 * np.max(np.abs(ref))


def test_fine_tuning_starts_from_unfolded_batchnorms(mlp):
  """prune_and_finetune unfolds BNs before fine-tuning (default) and not without epochs (then it is
  exactly intra_fuse, tested above); unfold_bn=False keeps the folded identities."""
  module, spec = ifjax.models.get("resnet20")
  rng = np.random.default_rng(0)
  data = (rng.normal(size=(64, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 64).astype(np.int32))
  variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  sgd0 = optax.sgd(0.0)  # no weight change: the BN statistics are what fine-tuning started from, moved by 2 steps
  runs = {u: finetune.prune_and_finetune("resnet20", variables, {"layer2_0/conv1": 0.5}, data, finetune_epochs=1,
                                         optimizer=sgd0, batch_size=32, unfold_bn=u, progress=False)
          for u in (True, False)}
  var = lambda r: np.asarray(r.variables["batch_stats"]["layer2_0"]["bn1"]["var"])
  scale = lambda r: np.asarray(r.variables["params"]["layer2_0"]["bn1"]["scale"])
  assert np.allclose(scale(runs[False]), 1.0) and not np.allclose(scale(runs[True]), 1.0)
  assert not np.allclose(var(runs[True]), var(runs[False]))
