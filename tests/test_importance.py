"""Built-in importance metrics against independent NumPy computations."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax import importance as imp

RTOL = 1e-5


def _variables(seed=0):
  """fc (Dense 3 -> 4, kernel (in, out)) + bias -> conv (2x2, 4 -> 5) -> out (5 -> 2)."""
  r = np.random.default_rng(seed)
  f = lambda *s: r.normal(size=s).astype(np.float32)
  return {"params": {"fc": {"kernel": f(3, 4), "bias": f(4)},
                     "conv": {"kernel": f(2, 2, 4, 5), "bias": f(5)},
                     "out": {"kernel": f(5, 2), "bias": f(2)}}}


SPEC = ifjax.Spec((
    ifjax.Group("h", [("params/fc/kernel", 1), ("params/fc/bias", 0)], [("params/conv/kernel", 2)]),
    ifjax.Group("c", [("params/conv/kernel", 3), ("params/conv/bias", 0)], [("params/out/kernel", 0)]),
))


def _rows(v, group):
  """NumPy: per weight member (ndim >= 2), the (n, d) matrix of neuron rows."""
  out = []
  for m in group.members:
    path, axis = m.path, m.axis
    c, mod, leaf = path.split("/")
    a = np.asarray(v[c][mod][leaf], np.float64)
    if a.ndim >= 2:
      out.append(np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1))
  return out


def _np_reduce(per_member):
  s = np.mean(np.stack(per_member), axis=0)
  return s / s.mean()


def _np_magnitude(v, group, p):
  if p == "inf":
    return _np_reduce([np.abs(r).max(1) for r in _rows(v, group)])
  return _np_reduce([(np.abs(r) ** p).sum(1) for r in _rows(v, group)])


# -- magnitude ---------------------------------------------------------------------
def test_l1_explicit():
  v = _variables()
  w1 = v["params"]["fc"]["kernel"].astype(np.float64)  # (3, 4): neuron i is column i
  w2 = v["params"]["conv"]["kernel"].astype(np.float64)  # (2, 2, 4, 5): neuron i is w2[:, :, i, :]
  s = (np.abs(w1).sum(0) + np.abs(w2).sum((0, 1, 3))) / 2  # bias excluded
  expected = s / s.mean()
  np.testing.assert_allclose(imp.magnitude(1)(v, SPEC["h"]), expected, rtol=RTOL)


@pytest.mark.parametrize("p,name", [(1, "l1"), (2, "l2"), (np.inf, "linf")])
@pytest.mark.parametrize("group", ["h", "c"])
def test_magnitude_matches_numpy(p, name, group):
  v = _variables()
  g = SPEC[group]
  expected = _np_magnitude(v, g, "inf" if np.isinf(p) else p)
  got = imp.magnitude(p)(v, g)
  assert got.shape == (SPEC.validate(v)[group],)
  np.testing.assert_allclose(got, expected, rtol=RTOL)
  np.testing.assert_allclose(imp.BUILTIN[name]()(v, g), expected, rtol=RTOL)
  np.testing.assert_allclose(float(jnp.mean(got)), 1.0, rtol=RTOL)


def test_l2_is_sum_of_squares_not_norm():
  v = _variables()
  g = SPEC["h"]
  sq = _np_reduce([(r ** 2).sum(1) for r in _rows(v, g)])
  root = _np_reduce([np.sqrt((r ** 2).sum(1)) for r in _rows(v, g)])
  got = np.asarray(imp.magnitude(2)(v, g))
  np.testing.assert_allclose(got, sq, rtol=RTOL)
  assert not np.allclose(got, root, rtol=1e-3)


def test_magnitude_ignores_biases():
  v = _variables()
  v["params"]["fc"]["bias"] = v["params"]["fc"]["bias"] * 1000
  np.testing.assert_allclose(imp.magnitude(1)(v, SPEC["h"]), imp.magnitude(1)(_variables(), SPEC["h"]), rtol=RTOL)


def test_magnitude_in_plan_matches_builtin_names():
  v = _variables()
  for name, p in (("l1", 1), ("l2", 2), ("linf", "inf")):
    pl = ifjax.plan(v, SPEC, 0.5, importance=name, fuse=False)
    for gname in ("h", "c"):
      np.testing.assert_allclose(pl[gname].importance, _np_magnitude(v, SPEC[gname], p), rtol=RTOL)


# -- LAMP -------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ["h", "c"])
def test_lamp(group):
  v = _variables()
  g = SPEC[group]
  s = np.mean(np.stack([(r ** 2).sum(1) for r in _rows(v, g)]), axis=0)  # squared L2 (un-normalised)
  assert len(np.unique(s)) == len(s)
  expected = np.array([si / s[s >= si].sum() for si in s])
  got = np.asarray(imp.lamp(v, g))
  np.testing.assert_allclose(got, expected, rtol=RTOL)
  l2 = np.asarray(imp.magnitude(2)(v, g))
  np.testing.assert_array_equal(np.argsort(got), np.argsort(l2))
  assert got[np.argmax(l2)] == pytest.approx(1.0)
  assert np.all(got > 0) and np.all(got <= 1 + 1e-6)
  np.testing.assert_allclose(ifjax.plan(v, SPEC, 0.2, importance="lamp", fuse=False)[group].importance, expected,
                             rtol=RTOL)


# -- random -----------------------------------------------------------------------------
def test_random():
  v = _variables()
  a = np.asarray(imp.random(0)(v, SPEC["h"]))
  assert a.shape == (4,)
  np.testing.assert_array_equal(a, imp.random(0)(v, SPEC["h"]))  # deterministic
  np.testing.assert_array_equal(a, imp.random(0)(_variables(seed=5), SPEC["h"]))  # data-independent
  assert not np.allclose(a, imp.random(1)(v, SPEC["h"]))  # seed matters
  b = np.asarray(imp.random(0)(v, SPEC["c"]))
  assert b.shape == (5,)
  assert not np.allclose(a, b[:4])  # groups get different draws
  for x in (a, b, np.asarray(imp.random(7)(v, SPEC["c"]))):
    assert np.all(x > 0) and np.all(x <= 1)
  np.testing.assert_array_equal(imp.random(jax.random.key(3))(v, SPEC["h"]), imp.random(3)(v, SPEC["h"]))
  pl = ifjax.plan(v, SPEC, 0.5, importance="random", fuse=False)
  np.testing.assert_array_equal(pl["h"].importance, a)


# -- Taylor -------------------------------------------------------------------------------
def _np_taylor(v, grads, group):
  pv = _rows(v, group)
  pg = _rows(grads, group)
  return _np_reduce([np.abs(w * g).sum(1) for w, g in zip(pv, pg)])


def _grads_like(v, seed=1):
  r = np.random.default_rng(seed)
  return {"params": jax.tree.map(lambda a: r.normal(size=a.shape).astype(np.float32), v["params"])}


@pytest.mark.parametrize("group", ["h", "c"])
def test_taylor_with_grads(group):
  v = _variables()
  g = _grads_like(v)
  expected = _np_taylor(v, g, SPEC[group])
  np.testing.assert_allclose(imp.taylor(g)(v, SPEC[group]), expected, rtol=RTOL)  # like variables
  np.testing.assert_allclose(imp.taylor(g["params"])(v, SPEC[group]), expected, rtol=RTOL)  # like params
  np.testing.assert_allclose(ifjax.plan(v, SPEC, 0.5, importance=imp.taylor(grads=g), fuse=False)[group].importance,
                             expected, rtol=RTOL)


def _forward(variables, x):
  p = variables["params"]
  h = jnp.tanh(x @ p["fc"]["kernel"] + p["fc"]["bias"])  # (b, 4)
  h = jnp.broadcast_to(h[:, None, None, :], h.shape[:1] + (3, 3, 4))
  c = jax.lax.conv_general_dilated(h, p["conv"]["kernel"], (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"]
  return jnp.tanh(c).mean((1, 2)) @ p["out"]["kernel"] + p["out"]["bias"]


def _loss(variables, batch):
  x, y = batch
  return jnp.mean((_forward(variables, x) - y) ** 2)


def _batches():
  r = np.random.default_rng(2)
  return tuple((r.normal(size=(4, 3)).astype(np.float32), r.normal(size=(4, 2)).astype(np.float32)) for _ in range(2))


@pytest.mark.parametrize("group", ["h", "c"])
def test_taylor_with_loss_fn_equals_summed_grads(group):
  v = _variables()
  batches = _batches()
  gs = [jax.grad(lambda p: _loss({"params": p}, b))(v["params"]) for b in batches]
  total = jax.tree.map(lambda a, b: a + b, *gs)
  expected = imp.taylor(grads=total)(v, SPEC[group])
  np.testing.assert_allclose(expected, _np_taylor(v, {"params": total}, SPEC[group]), rtol=1e-4)
  got = imp.taylor(loss_fn=_loss, batches=batches)(v, SPEC[group])
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  # a single batch differs from the sum of two
  single = imp.taylor(loss_fn=_loss, batches=batches[:1])(v, SPEC[group])
  assert not np.allclose(single, expected, rtol=1e-3)
  pl = ifjax.plan(v, SPEC, 0.5, importance=imp.taylor(loss_fn=_loss, batches=batches), fuse=False)
  np.testing.assert_allclose(pl[group].importance, expected, rtol=1e-4)


def test_taylor_loss_fn_follows_the_variables():
  """One taylor(loss_fn=...) object evaluated on two different variables gives each its own gradients."""
  batches = _batches()
  fn = imp.taylor(loss_fn=_loss, batches=batches)
  for seed in (0, 3):
    v = _variables(seed)
    grads = [jax.grad(lambda p: _loss({"params": p}, b))(v["params"]) for b in batches]
    total = jax.tree.map(lambda *a: sum(a), *grads)
    np.testing.assert_allclose(fn(v, SPEC["h"]), imp.taylor(grads=total)(v, SPEC["h"]), rtol=1e-4)


# -- CHIP ---------------------------------------------------------------------------------
def _np_chip(fm):
  fm = np.asarray(fm, np.float64)
  b, n = fm.shape[0], fm.shape[-1]
  out = np.zeros(n)
  for k in range(b):
    a = fm[k].reshape(-1, n).T  # (channels, spatial)
    full = np.linalg.norm(a, "nuc")
    for i in range(n):
      z = a.copy()
      z[i] = 0
      out[i] += full - np.linalg.norm(z, "nuc")
  return out / b


def test_chip_matches_numpy():
  r = np.random.default_rng(4)
  fm = r.normal(size=(2, 4, 4, 5)).astype(np.float32)
  v = _variables()
  got = np.asarray(imp.chip({"c": fm})(v, SPEC["c"]))
  expected = _np_chip(fm)
  assert got.shape == (5,)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # a list of maps (one per producer) is averaged
  fm2 = r.normal(size=(2, 4, 4, 5)).astype(np.float32)
  np.testing.assert_allclose(imp.chip({"c": [fm, fm2]})(v, SPEC["c"]), (expected + _np_chip(fm2)) / 2,
                             rtol=1e-4, atol=1e-4)


def test_chip_missing_group():
  with pytest.raises(ValueError, match="'h'"):
    imp.chip({"c": np.ones((1, 2, 2, 5), np.float32)})(_variables(), SPEC["h"])


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(5, (3, 3), name="conv0")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn0")(x)
    x = nn.relu(x)
    x = nn.Conv(3, (3, 3), name="conv1")(x)
    return jnp.mean(x, axis=(1, 2))


NET_SPEC = ifjax.Spec(
    groups=(ifjax.Group("c0", [("params/conv0/kernel", 3), ("params/conv0/bias", 0)], [("params/conv1/kernel", 2)]),
            ifjax.Group("c1", [("params/conv1/kernel", 3), ("params/conv1/bias", 0)])),
    batchnorms=[("conv0", "bn0")],
)


def test_feature_maps_and_chip_on_a_flax_model():
  net = _Net()
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 4, 2)), jnp.float32)
  v = net.init(jax.random.key(0), x, train=False)
  fms = imp.feature_maps(net, v, x, NET_SPEC, train=False)
  assert set(fms) == {"c0", "c1"}
  assert [np.shape(a) for a in fms["c0"]] == [(2, 4, 4, 5)]
  assert [np.shape(a) for a in fms["c1"]] == [(2, 4, 4, 3)]
  conv0 = nn.Conv(5, (3, 3)).apply({"params": v["params"]["conv0"]}, x)
  np.testing.assert_allclose(fms["c0"][0], conv0, rtol=1e-5, atol=1e-6)
  pl = ifjax.plan(v, NET_SPEC, 0.4, importance=imp.chip(fms), fuse=False)
  np.testing.assert_allclose(pl["c0"].importance, _np_chip(fms["c0"][0]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pl["c1"].importance, _np_chip(fms["c1"][0]), rtol=1e-4, atol=1e-4)
  assert pl["c0"].keep.shape == (3,)


# -- BN folding inside plan -----------------------------------------------------------------
def _bn_variables():
  w = np.array([[3.0, 1.0, 1.0, 1.1], [3.0, 1.0, 1.2, 1.0]], np.float32)  # unfolded: channel 0 is largest
  return {"params": {"fc": {"kernel": w, "bias": np.zeros(4, np.float32)},
                     "bn": {"scale": np.array([0.01, 1.0, 1.0, 100.0], np.float32),
                            "bias": np.array([0.1, -0.2, 0.3, 0.0], np.float32)},
                     "out": {"kernel": np.full((4, 2), 0.01, np.float32)}},
          "batch_stats": {"bn": {"mean": np.array([0.5, 0.0, -0.5, 1.0], np.float32),
                                 "var": np.array([1.0, 2.0, 0.5, 4.0], np.float32)}}}


BN_SPEC = ifjax.Spec((ifjax.Group("h", [("params/fc/kernel", 1), ("params/fc/bias", 0)], [("params/out/kernel", 0)]),),
                     batchnorms=[("fc", "bn", 1e-5)])


def test_importance_is_computed_on_folded_variables():
  v = _bn_variables()
  g = BN_SPEC["h"]
  pl = ifjax.plan(v, BN_SPEC, 0.75, importance="l1", fuse=False)
  folded = ifjax.fold_batchnorm(v, BN_SPEC)
  np.testing.assert_allclose(pl["h"].importance, imp.magnitude(1)(folded, g), rtol=RTOL)
  # independent NumPy fold
  s = v["params"]["bn"]["scale"] / np.sqrt(v["batch_stats"]["bn"]["var"] + 1e-5)
  wf = v["params"]["fc"]["kernel"] * s
  per = (np.abs(wf).sum(0) + np.abs(v["params"]["out"]["kernel"]).sum(1)) / 2
  np.testing.assert_allclose(pl["h"].importance, per / per.mean(), rtol=RTOL)
  unfolded = np.asarray(imp.magnitude(1)(v, g))
  assert np.argmax(unfolded) == 0 and np.argmax(pl["h"].importance) == 3
  np.testing.assert_array_equal(pl["h"].keep, [3])
  pruned = ifjax.prune(v, BN_SPEC, 0.75)
  np.testing.assert_allclose(pruned["params"]["fc"]["kernel"], wf[:, [3]], rtol=RTOL)


def test_callable_receives_folded_variables():
  v = _bn_variables()
  seen = []

  def fn(variables, group):
    seen.append((variables, group))
    return jnp.arange(4.0)

  ifjax.plan(v, BN_SPEC, 0.5, importance=fn, fuse=False)
  (fv, grp), = seen
  assert grp == dataclasses.replace(BN_SPEC["h"], size=4)  # arrives with its size filled in
  np.testing.assert_allclose(fv["params"]["fc"]["kernel"], ifjax.fold_batchnorm(v, BN_SPEC)["params"]["fc"]["kernel"])


# -- user callables and keep ----------------------------------------------------------------
@pytest.mark.parametrize("fuse", [False, True])
def test_user_callable_and_keep(fuse):
  v = _variables()
  scores = {"h": np.array([0.3, 2.0, -1.0, 0.7], np.float32), "c": np.array([5.0, 0.1, 4.0, 0.2, 3.0], np.float32)}
  fn = lambda variables, group: jnp.asarray(scores[group.name])
  pl = ifjax.plan(v, SPEC, {"h": 0.5, "c": 0.4}, importance=fn, fuse=fuse)
  for name, m in (("h", 2), ("c", 3)):
    np.testing.assert_array_equal(pl[name].importance, scores[name])
    expected = np.sort(np.argsort(-scores[name], kind="stable")[:m])
    np.testing.assert_array_equal(pl[name].keep, expected)
    assert pl[name].keep.dtype == jnp.int32
  np.testing.assert_array_equal(pl["h"].keep, [1, 3])
  np.testing.assert_array_equal(pl["c"].keep, [0, 2, 4])


def test_precomputed_dict_same_as_callable():
  v = _variables()
  scores = {"h": np.array([0.3, 2.0, 1.0, 0.7], np.float32), "c": np.array([5.0, 0.1, 4.0, 0.2, 3.0], np.float32)}
  a = ifjax.plan(v, SPEC, 0.5, importance=scores, fuse=False)
  b = ifjax.plan(v, SPEC, 0.5, importance=lambda vv, g: jnp.asarray(scores[g.name]), fuse=False)
  for k in ("h", "c"):
    np.testing.assert_array_equal(a[k].keep, b[k].keep)
    np.testing.assert_array_equal(a[k].importance, scores[k])


def test_keep_prefers_lower_index_on_ties():
  v = _variables()
  pl = ifjax.plan(v, SPEC, 0.5, importance=lambda vv, g: jnp.ones(4 if g.name == "h" else 5), fuse=False,
                  groups="h")
  np.testing.assert_array_equal(pl["h"].keep, [0, 1])
  assert list(pl) == ["h"]
