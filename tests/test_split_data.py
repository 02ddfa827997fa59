"""ifjax.split_data: folds, k-fold subsets, parallel training, PaF / FaP / whole-data end to end."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ifjax
from ifjax import split_data


@pytest.mark.parametrize("n,k", [(10, 2), (12, 4), (60, 6)])
def test_folds_are_disjoint_equal_and_cover(n, k):
  parts = split_data.folds(n, k, seed=3)
  assert [len(p) for p in parts] == [n // k] * k
  assert sorted(np.concatenate(parts).tolist()) == list(range(n))
  assert split_data.folds(n, k, seed=3)[0].tolist() == parts[0].tolist()  # deterministic
  subsets = split_data.subsets(k)
  assert len(subsets) == math.comb(k, k // 2) and all(len(s) == k // 2 for s in subsets)


def test_split_gives_half_data_training_sets():
  images, labels = np.arange(24)[:, None].astype(np.float32), np.arange(24)
  sets = split_data.split((images, labels), 4, seed=1)
  assert len(sets) == 6 and all(len(x) == 12 for x, _ in sets)
  assert all(np.array_equal(x[:, 0], y) for x, y in sets)  # images stay with their labels
  a, b = split_data.split((images, labels), 2, seed=1)
  assert not set(a[1].tolist()) & set(b[1].tolist())  # k=2: disjoint halves


def test_bad_input():
  with pytest.raises(split_data.SplitDataError, match="do not divide 10"):
    split_data.folds(10, 3)
  assert [len(f) for f in split_data.folds(10, 3, drop_remainder=True)] == [3, 3, 3]
  with pytest.raises(split_data.SplitDataError, match="even k"):
    split_data.subsets(3)
  with pytest.raises(split_data.SplitDataError, match="k must be an int >= 2"):
    split_data.folds(10, 1)
  with pytest.raises(split_data.SplitDataError, match="labels"):
    split_data.split((np.zeros((4, 1)), np.zeros(3)), 2)


def _clusters(n=384, d=64, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, d)).astype(np.float32)
  labels = rng.integers(0, classes, n).astype(np.int32)
  return (centers[labels] + 0.7 * rng.normal(size=(n, d))).astype(np.float32), labels


def test_paf_fap_and_whole_data_run_end_to_end():
  module, spec = ifjax.models.get("mlp")
  data = _clusters()
  test = _clusters(200, seed=0)
  test = (test[0][-100:], test[1][-100:])
  init = [module.init(jax.random.key(i), jnp.zeros((1, 64))) for i in range(2)]
  opt = optax.sgd(0.05, momentum=0.9)
  models, history, seconds = split_data.train_models(module, init, split_data.split(data, 2), epochs=3, optimizer=opt,
                                                     batch_size=32, progress=False, eval_data=test)
  assert len(models) == 2 and seconds > 0 and len(history) == 3
  assert min(history[-1]["eval_accuracy"]) > 0.5
  common = dict(prune_epochs=1, finetune_epochs=1, eval_data=test, batch_size=32, progress=False, optimizer=opt)
  paf = split_data.prune_and_fuse("mlp", models, 0.5, data, fusion="weights", **common)
  fap = split_data.fuse_and_prune("mlp", models, 0.5, data, fusion="activations", fusion_samples=50, **common)
  for res in (paf, fap):
    assert res.widths == {"dense0": 64, "dense1": 32}
    assert set(res.seconds) == {"prune", "fuse", "finetune"} and all(v > 0 for v in res.seconds.values())
    assert res.accuracy > 0.5
    small, _ = ifjax.models.get("mlp", widths=res.widths)
    assert small.apply(res.variables, test[0]).shape == (100, 10)
  whole, _ = ifjax.train.fit(module, init[0], data, epochs=3, optimizer=opt, batch_size=32, progress=False)
  base = split_data.whole_data("mlp", whole, 0.5, data, prune_epochs=1, finetune_epochs=2, **{
      k: v for k, v in common.items() if k not in ("prune_epochs", "finetune_epochs")})
  assert base.widths == paf.widths and base.accuracy > 0.5


def test_four_fold_split_data_trains_and_fuses_six_models():
  module, spec = ifjax.models.get("mlp")
  data = _clusters(480)
  sets = split_data.split(data, 4, seed=2)
  assert len(sets) == 6 and all(len(y) == 240 for _, y in sets)
  init = [module.init(jax.random.key(i), jnp.zeros((1, 64))) for i in range(6)]
  models, history, _ = split_data.train_models(module, init, sets, epochs=2, optimizer=optax.sgd(0.05, momentum=0.9),
                                               batch_size=48, progress=False)
  assert len(models) == 6 and len(history[-1]["loss"]) == 6
  # each model trained on its own set: they differ from each other
  assert not np.allclose(models[0]["params"]["head"]["kernel"], models[1]["params"]["head"]["kernel"])
  fap = split_data.fuse_and_prune("mlp", models, 0.5, data, prune_epochs=1, finetune_epochs=1, fusion="weights",
                                  eval_data=data, batch_size=48, progress=False, optimizer=optax.sgd(0.05))
  assert fap.widths == {"dense0": 64, "dense1": 32} and fap.accuracy > 0.5


# -- skewed / overlapping splits, errors, pinned processes (issue 23) ------------------------------------------------
def _labelled(per_class, classes=10):
  labels = np.repeat(np.arange(classes), per_class).astype(np.int32)
  return np.arange(len(labels))[:, None].astype(np.float32), labels


@pytest.mark.parametrize("k,skew", [(2, 0.8), (2, 0.5), (4, 0.7)])
def test_skewed_folds_have_the_stated_class_proportions_and_are_disjoint_and_complete(k, skew):
  x, y = _labelled(100)
  parts = split_data.skewed_folds(y, k, skew, seed=4)
  everything = np.concatenate(parts)
  assert len(everything) == len(y) and sorted(everything.tolist()) == list(range(len(y)))  # disjoint, complete
  for c in range(10):
    counts = [int(np.sum(y[p] == c)) for p in parts]
    assert counts[c % k] == round(skew * 100)  # the major fold of class c
    assert sum(counts) == 100 and max(counts[:c % k] + counts[c % k + 1:]) - min(
        counts[:c % k] + counts[c % k + 1:]) <= 1  # the rest spread evenly


def test_split_with_skew_alternates_the_major_half_by_class():
  x, y = _labelled(50)
  (xa, ya), (xb, yb) = split_data.split((x, y), 2, skew=0.8, seed=1)
  assert len(ya) == len(yb) == 250
  assert np.bincount(ya).tolist() == [40, 10] * 5 and np.bincount(yb).tolist() == [10, 40] * 5
  assert not set(xa[:, 0].tolist()) & set(xb[:, 0].tolist())  # disjoint
  assert np.array_equal(y[xa[:, 0].astype(int)], ya)  # images stay with their labels
  sets = split_data.split((x, y), 4, skew=0.7, seed=1)  # k=4: six unions of two skewed folds
  assert len(sets) == 6


def test_split_with_overlap_shares_a_part_and_keeps_the_old_iid_folds():
  x, y = _labelled(10)
  (xa, _), (xb, _) = split_data.split((x, y), 2, overlap=0.3, seed=2)
  a, b = set(xa[:, 0].tolist()), set(xb[:, 0].tolist())
  assert len(a) == len(b) == 65 and len(a & b) == 30 and len(a | b) == 100  # 65% subsets, 30% shared
  old = split_data.folds(100, 2, seed=2)  # no skew / overlap: the same halves as before these options
  assert split_data.split((x, y), 2, seed=2)[0][0][:, 0].astype(int).tolist() == old[0].tolist()


def test_split_errors():
  x, y = _labelled(10, classes=3)
  with pytest.raises(split_data.SplitDataError, match="needs at least 4 classes"):
    split_data.split((x, y), 4, skew=0.8)
  with pytest.raises(split_data.SplitDataError, match=r"in \[1/k, 1\]"):
    split_data.split((x, y), 2, skew=0.3)
  with pytest.raises(split_data.SplitDataError, match="overlap"):
    split_data.split((x, y), 2, overlap=1.0)


def test_unequal_shards_and_too_few_devices_are_refused():
  module, _ = ifjax.models.get("mlp")
  x, y = _clusters(96)
  sets = [(x[:64], y[:64]), (x[64:], y[64:])]
  init = [module.init(jax.random.key(0), jnp.zeros((1, 64)))] * 2
  with pytest.raises(split_data.SplitDataError, match=r"equal in size.*\[64, 32\]"):
    split_data.train_models(module, init, sets, epochs=1, optimizer=optax.sgd(0.1), progress=False)
  mesh = ifjax.train.make_mesh({"models": 1, "data": 1}, jax.devices()[:1])
  with pytest.raises(split_data.SplitDataError, match="own devices"):
    split_data.train_models(module, init, [sets[1], sets[1]], epochs=1, optimizer=optax.sgd(0.1), mesh=mesh)
  with pytest.raises(split_data.SplitDataError, match="3 models need 3 disjoint core sets"):
    split_data.core_sets(3, [0, 1])
  with pytest.raises(split_data.SplitDataError, match="disjoint"):
    split_data.core_sets(2, [[0], [0]])


def _sgd(steps):
  return optax.sgd(0.05, momentum=0.9)


def test_pinned_process_training_gives_the_in_process_model():
  module, _ = ifjax.models.get("mlp")
  data = _clusters(256)
  init = module.init(jax.random.key(3), jnp.zeros((1, 64)))
  kw = dict(epochs=2, optimizer=_sgd, batch_size=32, seed=5, progress=False)
  here, hist = ifjax.train.fit(module, init, data, **kw)
  cores = split_data.core_sets(1)  # the first core of this process's affinity
  pinned, hists, res = split_data.train_pinned("mlp", [init], [data], cores=cores, **kw)
  assert res.cores == cores and res.seconds[0] > 0 and res.wall >= res.seconds[0]
  assert len(hists[0]) == 2 and abs(hists[0][-1]["loss"] - hist[-1]["loss"]) < 1e-4
  flat = jax.tree_util.tree_leaves_with_path(here)
  other = dict(jax.tree_util.tree_leaves_with_path(pinned[0]))
  for path, leaf in flat:
    np.testing.assert_allclose(other[path], leaf, rtol=1e-4, atol=1e-5)
  assert not np.allclose(pinned[0]["params"]["head"]["kernel"], init["params"]["head"]["kernel"])  # it trained


def test_pinned_job_errors_carry_the_child_traceback():
  with pytest.raises(split_data.PinnedError, match="unknown model|KeyError|mlp_nope"):
    split_data.train_pinned("mlp_nope", [{}], [_clusters(64)], epochs=1, optimizer=_sgd, cores=split_data.core_sets(1))
