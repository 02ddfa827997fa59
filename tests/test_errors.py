"""Every bad input to intra_fuse / prune / plan gets a clear error, and inputs are never mutated."""

import copy
import math
import re

import numpy as np
import pytest

import ifjax


def _variables():
  """fc0 (3 -> 4) + bn0 -> fc1 (4 -> 3) -> fc2 (3 -> 2). NumPy arrays, so mutation would be visible."""
  r = np.random.default_rng(0)
  f = lambda *s: r.normal(size=s).astype(np.float32)
  return {
      "params": {
          "fc0": {"kernel": f(3, 4), "bias": f(4)},
          "bn0": {"scale": f(4), "bias": f(4)},
          "fc1": {"kernel": f(4, 3), "bias": f(3)},
          "fc2": {"kernel": f(3, 2), "bias": f(2)},
      },
      "batch_stats": {"bn0": {"mean": f(4), "var": np.abs(f(4)) + 0.5}},
  }


SPEC = ifjax.Spec(
    groups=(
        ifjax.Group("h0", [("params/fc0/kernel", 1), ("params/fc0/bias", 0)], [("params/fc1/kernel", 0)]),
        ifjax.Group("h1", [("params/fc1/kernel", 1), ("params/fc1/bias", 0)], [("params/fc2/kernel", 0)]),
    ),
    batchnorms=[("fc0", "bn0")],
)

FNS = [pytest.param(ifjax.intra_fuse, id="intra_fuse"), pytest.param(ifjax.prune, id="prune")]


def _assert_same(a, b):
  assert type(a) is type(b)
  if isinstance(a, dict):
    assert list(a) == list(b)
    for k in a:
      _assert_same(a[k], b[k])
  else:
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype


def test_valid_inputs_work():
  for fn in (ifjax.intra_fuse, ifjax.prune):
    out = fn(_variables(), SPEC, 0.34)
    assert ifjax.widths(out, SPEC) == {"h0": 2, "h1": 1}


# -- ratio ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1, 1.5, float("nan"), np.float32("nan"), float("inf"), "0.5", True,
                                   False, None, [0.5]])
def test_bad_ratio(fn, ratio):
  with pytest.raises(ValueError, match=r"ratio .*must be a number in \[0, 1\)"):
    fn(_variables(), SPEC, ratio)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("ratio", [-0.5, 1.0, float("nan"), "x", True])
def test_bad_ratio_in_dict(fn, ratio):
  with pytest.raises(ValueError, match=r"ratio for group 'h1' must be a number in \[0, 1\)"):
    fn(_variables(), SPEC, {"h0": 0.25, "h1": ratio})


@pytest.mark.parametrize("fn", FNS)
def test_ratio_leaving_no_neurons(fn):
  # h1 has n = 3; floor(3 * 0.3) = 0
  with pytest.raises(ValueError, match=r"group 'h1'.*at least one must remain"):
    fn(_variables(), SPEC, 0.7)
  with pytest.raises(ValueError, match=r"'h1'.*0 of 3 neurons"):
    fn(_variables(), SPEC, {"h1": 0.7})
  with pytest.raises(ValueError, match=r"'h0'.*0 of 4 neurons"):
    fn(_variables(), SPEC, {"h0": 0.9, "h1": 0.1})


# -- non-finite / non-float parameters ----------------------------------------------------------
@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("path", ["params/fc0/kernel", "params/fc0/bias", "params/fc1/kernel", "params/fc2/kernel",
                                  "params/fc1/bias", "params/bn0/scale", "params/bn0/bias", "batch_stats/bn0/mean",
                                  "batch_stats/bn0/var"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_parameter(fn, path, bad):
  v = _variables()
  c, mod, leaf = path.split("/")
  v[c][mod][leaf].reshape(-1)[1] = bad
  with pytest.raises(ValueError, match=re.escape(repr(path)) + ".*NaN or Inf"):
    fn(v, SPEC, 0.5)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("path", ["params/fc1/kernel", "params/fc0/bias", "batch_stats/bn0/var"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64])
def test_non_float_parameter(fn, path, dtype):
  v = _variables()
  c, mod, leaf = path.split("/")
  v[c][mod][leaf] = np.ones(v[c][mod][leaf].shape, dtype)
  name = np.dtype(dtype).name
  with pytest.raises(TypeError, match=re.escape(repr(path)) + f".*{name}.*floating"):
    fn(v, SPEC, 0.5)


@pytest.mark.parametrize("fn", FNS)
def test_negative_batchnorm_variance(fn):
  """A negative running variance makes the fold produce NaN; it must be an error, not NaN weights."""
  v = _variables()
  v["batch_stats"]["bn0"]["var"][2] = -1.0
  with pytest.raises(ValueError, match="var"):
    fn(v, SPEC, 0.5, importance={"h0": np.arange(1.0, 5.0), "h1": np.arange(1.0, 4.0)})


# -- spec / variables mismatch --------------------------------------------------------------------
def _spec_with(member, where="consumers"):
  g = SPEC["h1"]
  g2 = ifjax.Group("h1", g.producers if where == "consumers" else (member,), (member,) if where == "consumers" else
                   g.consumers)
  return ifjax.Spec((SPEC["h0"], g2), SPEC.batchnorms)


@pytest.mark.parametrize("fn", FNS)
def test_spec_unknown_path(fn):
  with pytest.raises(ValueError, match=r"unknown path 'params/fc9/kernel'"):
    fn(_variables(), _spec_with(("params/fc9/kernel", 0)), 0.5)


@pytest.mark.parametrize("fn", FNS)
def test_spec_wrong_axis(fn):
  with pytest.raises(ValueError, match=r"axis 2 is out of range for 'params/fc2/kernel' with shape \(3, 2\)"):
    fn(_variables(), _spec_with(("params/fc2/kernel", 2)), 0.5)


@pytest.mark.parametrize("fn", FNS)
def test_spec_size_mismatch(fn):
  # fc2's out axis has 2 entries, h1 has 3 neurons
  with pytest.raises(ValueError, match=r"'params/fc1/kernel'.* 3.*'params/fc2/kernel'.* 2 "):
    fn(_variables(), _spec_with(("params/fc2/kernel", 1)), 0.5)


@pytest.mark.parametrize("fn", FNS)
def test_spec_batchnorm_mismatch(fn):
  spec = ifjax.Spec(SPEC.groups, batchnorms=[("fc1", "bn0")])  # fc1 has 3 outputs, bn0 has 4 channels
  with pytest.raises(ValueError, match=r"batch_stats/bn0/mean"):
    fn(_variables(), spec, 0.5)
  spec = ifjax.Spec(SPEC.groups, batchnorms=[("fc0", "bn7")])
  with pytest.raises(ValueError, match=r"batch_stats/bn7/mean"):
    fn(_variables(), spec, 0.5)


# -- choices ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("name", ["l3", "L1", "magnitude", ""])
def test_unknown_importance_name(fn, name):
  with pytest.raises(ValueError, match=r"unknown importance .*\['l1', 'l2', 'lamp', 'linf', 'random'\]"):
    fn(_variables(), SPEC, 0.5, importance=name)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("name", ["taylor", "chip"])
def test_data_importance_by_name_hints(fn, name):
  with pytest.raises(ValueError, match=rf"unknown importance '{name}'.*ifjax\.importance\.taylor"):
    fn(_variables(), SPEC, 0.5, importance=name)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("bad", [3, 0.5, None, [1.0, 2.0]])
def test_importance_of_wrong_type(fn, bad):
  with pytest.raises(ValueError, match="importance must be a name, a callable or a dict"):
    fn(_variables(), SPEC, 0.5, importance=bad)


@pytest.mark.parametrize("fn", [pytest.param(ifjax.intra_fuse, id="intra_fuse"),
                                pytest.param(ifjax.plan, id="plan")])
@pytest.mark.parametrize("option,value,options", [
    ("solver", "emd", "('exact', 'sinkhorn')"),
    ("target", "centroid", "('most_important', 'cluster_centroid')"),
    ("normalization", "average", "('paper', 'barycentric')"),
    ("source_mass", "importances", "('uniform', 'importance')"),
    ("target_mass", "l1", "('uniform', 'importance')"),
    ("fallback", "ignore", "('exact', 'warn', 'raise')"),
])
def test_unknown_option(fn, option, value, options):
  with pytest.raises(ValueError, match=rf"{option} must be one of {re.escape(options)}, got '{value}'"):
    fn(_variables(), SPEC, 0.5, **{option: value})


def test_unknown_keyword_is_type_error():
  with pytest.raises(TypeError, match="solvr"):
    ifjax.intra_fuse(_variables(), SPEC, 0.5, solvr="exact")
  with pytest.raises(TypeError, match="solver"):
    ifjax.prune(_variables(), SPEC, 0.5, solver="exact")


def test_plain_pruning_with_centroid_target():
  with pytest.raises(ValueError, match="method='default'.*most_important"):
    ifjax.plan(_variables(), SPEC, 0.5, method="default", target="cluster_centroid")
  with pytest.raises(ValueError, match="method='default'.*most_important"):
    ifjax.intra_fuse(_variables(), SPEC, 0.5, method="default", target="cluster_centroid")
  with pytest.warns(DeprecationWarning, match="fuse= is deprecated"):  # the old spelling, still an alias
    with pytest.raises(ValueError, match="method='default'.*most_important"):
      ifjax.plan(_variables(), SPEC, 0.5, fuse=False, target="cluster_centroid")


# -- precomputed importance -------------------------------------------------------------------------
GOOD = {"h0": np.array([1.0, 2.0, 3.0, 4.0], np.float32), "h1": np.array([1.0, 2.0, 3.0], np.float32)}


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("bad", [np.ones(2), np.ones((3, 1)), np.ones(4), np.float32(1.0)])
def test_precomputed_wrong_shape(fn, bad):
  with pytest.raises(ValueError, match=r"importance for group 'h1' has shape .*expected \(3,\)"):
    fn(_variables(), SPEC, 0.5, importance={**GOOD, "h1": bad})


@pytest.mark.parametrize("fn", FNS)
def test_precomputed_missing_group(fn):
  with pytest.raises(ValueError, match=r"no scores for group 'h1' \(has \['h0'\]\)"):
    fn(_variables(), SPEC, 0.5, importance={"h0": GOOD["h0"]})
  # a missing group that is not pruned is fine
  fn(_variables(), SPEC, 0.5, importance={"h0": GOOD["h0"]}, groups="h0")


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_precomputed_non_finite(fn, bad):
  with pytest.raises(ValueError, match=r"importance for group 'h0' has NaN or Inf"):
    fn(_variables(), SPEC, 0.5, importance={**GOOD, "h0": np.array([1.0, bad, 3.0, 4.0])})


@pytest.mark.parametrize("fn", FNS)
def test_callable_importance_wrong_shape(fn):
  with pytest.raises(ValueError, match=r"importance for group 'h0' has shape \(5,\), expected \(4,\)"):
    fn(_variables(), SPEC, 0.5, importance=lambda v, g: np.ones(5))


@pytest.mark.parametrize("mass", ["source_mass", "target_mass"])
def test_negative_scores_with_importance_masses(mass):
  neg = {**GOOD, "h1": np.array([1.0, -2.0, 3.0], np.float32)}
  with pytest.raises(ValueError, match=r"group 'h1'.*non-negative"):
    ifjax.intra_fuse(_variables(), SPEC, 0.5, importance=neg, **{mass: "importance"})
  with pytest.raises(ValueError, match=r"group 'h1'.*non-negative"):
    ifjax.plan(_variables(), SPEC, 0.5, importance=neg, **{mass: "importance"})
  # uniform masses and plain pruning accept negative scores
  ifjax.intra_fuse(_variables(), SPEC, 0.5, importance=neg)
  ifjax.prune(_variables(), SPEC, 0.5, importance=neg)


@pytest.mark.parametrize("mass", ["source_mass", "target_mass"])
def test_all_zero_scores_with_importance_masses(mass):
  zero = {**GOOD, "h1": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match=r"group 'h1'.*sum to zero"):
    ifjax.intra_fuse(_variables(), SPEC, 0.5, importance=zero, **{mass: "importance"})


# -- group selection --------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", FNS)
def test_unknown_group_in_groups(fn):
  with pytest.raises(ValueError, match=r"unknown group 'h9'; groups are \['h0', 'h1'\]"):
    fn(_variables(), SPEC, 0.5, groups=["h0", "h9"])
  with pytest.raises(ValueError, match=r"unknown group 'h9'"):
    fn(_variables(), SPEC, 0.5, groups="h9")


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("index", [2, -1, 100])
def test_paper_index_out_of_range_in_groups(fn, index):
  with pytest.raises(ValueError, match=rf"paper group index {index} out of range.*2 groups"):
    fn(_variables(), SPEC, 0.5, groups=[0, index])


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("bad", [1.0, None, ("h0",)])
def test_bad_group_key_type(fn, bad):
  with pytest.raises(ValueError, match="name .*or paper index"):
    fn(_variables(), SPEC, 0.5, groups=[bad])


@pytest.mark.parametrize("fn", FNS)
def test_unknown_group_in_ratio_dict(fn):
  with pytest.raises(ValueError, match=r"unknown group 'h9'"):
    fn(_variables(), SPEC, {"h0": 0.5, "h9": 0.5})
  with pytest.raises(ValueError, match=r"paper group index 2 out of range"):
    fn(_variables(), SPEC, {0: 0.5, 2: 0.5})


def test_ratio_dict_by_paper_index_works():
  out = ifjax.prune(_variables(), SPEC, {0: 0.3})  # paper index 0 = h1, the group closest to the output
  assert ifjax.widths(out, SPEC) == {"h0": 4, "h1": 2}


# -- plans and variables ----------------------------------------------------------------------------
def test_plan_applied_to_spec_lacking_its_group():
  v = _variables()
  pl = ifjax.plan(v, SPEC, 0.5)
  small = ifjax.Spec((SPEC["h0"],), SPEC.batchnorms)
  with pytest.raises(ValueError, match=r"plan has group 'h1', which the spec does not have \(\['h0'\]\)"):
    ifjax.apply_plan(v, small, pl)
  renamed = ifjax.Spec((SPEC["h0"], ifjax.Group("other", SPEC["h1"].producers, SPEC["h1"].consumers)),
                       SPEC.batchnorms)
  with pytest.raises(ValueError, match=r"'h1'"):
    ifjax.apply_plan(v, renamed, pl)


@pytest.mark.parametrize("fn", FNS + [pytest.param(ifjax.plan, id="plan")])
@pytest.mark.parametrize("bad", [None, [1, 2], "params", np.ones(3), "variables-without-params", "params-only"])
def test_variables_not_a_flax_dict(fn, bad):
  if isinstance(bad, str) and bad == "variables-without-params":
    bad = {"batch_stats": _variables()["batch_stats"]}
  elif isinstance(bad, str) and bad == "params-only":
    bad = _variables()["params"]  # a common mistake: passing params instead of variables
  with pytest.raises(ValueError, match=r"variables must be a Flax variables dict with a 'params' collection"):
    fn(bad, SPEC, 0.5)


# -- inputs are never mutated ------------------------------------------------------------------------
def _nan_in_var(v):
  v["batch_stats"]["bn0"]["var"][0] = np.nan


def _nan_in_fc2(v):
  v["params"]["fc2"]["kernel"][0, 0] = np.inf


CASES = [
    ("ok", None, dict(ratio=0.5)),
    ("ratio", None, dict(ratio=0.7)),
    ("ratio-dict", None, dict(ratio={"h0": 0.5, "h1": 1.0})),
    ("second-group-empty", None, dict(ratio={"h0": 0.5, "h1": 0.7})),
    ("missing-scores", None, dict(ratio=0.5, importance={"h0": GOOD["h0"]})),
    ("bad-shape", None, dict(ratio=0.5, importance={**GOOD, "h1": np.ones(4)})),
    ("nan", _nan_in_var, dict(ratio=0.5)),
    ("inf", _nan_in_fc2, dict(ratio=0.5)),
    ("raising-callable", None, dict(ratio=0.5, importance=lambda v, g: 1 / 0)),
]


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("case,edit,kwargs", CASES, ids=[c[0] for c in CASES])
def test_inputs_not_mutated(fn, case, edit, kwargs):
  v = _variables()
  if edit is not None:
    edit(v)
  before = copy.deepcopy(v)
  spec_before = copy.deepcopy(SPEC)
  kwargs = dict(kwargs)
  imp = kwargs.get("importance")
  imp_before = copy.deepcopy(imp) if isinstance(imp, dict) else None
  ratio = kwargs.pop("ratio")
  ratio_before = copy.deepcopy(ratio)
  try:
    fn(v, SPEC, ratio, **kwargs)
  except (ValueError, TypeError, ZeroDivisionError):
    assert case != "ok"
  else:
    assert case == "ok"
  _assert_same(v, before)
  assert SPEC == spec_before
  if isinstance(ratio, dict):
    assert ratio == ratio_before
  else:
    assert ratio == ratio_before or (isinstance(ratio, float) and math.isnan(ratio))
  if imp_before is not None:
    assert list(imp) == list(imp_before)
    for k in imp:
      np.testing.assert_array_equal(imp[k], imp_before[k])


def test_callable_importance_mutating_its_argument_cannot_touch_inputs():
  v = _variables()
  before = copy.deepcopy(v)

  def evil(variables, group):
    variables["params"]["fc0"]["kernel"] = np.zeros((3, 4), np.float32)
    variables["params"].pop("fc2", None)
    return np.ones(4 if group.name == "h0" else 3, np.float32)

  try:
    ifjax.plan(v, SPEC, 0.5, importance=evil)
  except Exception:  # noqa: BLE001 (whatever happens to the plan itself, the caller's dict must be untouched)
    pass
  _assert_same(v, before)


# -- data-driven importance misuse ---------------------------------------------------------------------
def test_taylor_argument_errors():
  grads = {"params": _variables()["params"]}
  with pytest.raises(ValueError, match="exactly one of grads= or loss_fn="):
    ifjax.importance.taylor()
  with pytest.raises(ValueError, match="exactly one of grads= or loss_fn="):
    ifjax.importance.taylor(grads, loss_fn=lambda v, b: 0.0, batches=(1,))
  with pytest.raises(ValueError, match="at least one batch"):
    ifjax.importance.taylor(loss_fn=lambda v, b: 0.0)


@pytest.mark.parametrize("fn", FNS)
def test_taylor_missing_gradient(fn):
  grads = copy.deepcopy(_variables()["params"])
  del grads["fc2"]
  with pytest.raises(ValueError, match=r"no gradient for \['params/fc2/kernel'\]"):
    fn(_variables(), SPEC, 0.5, importance=ifjax.importance.taylor(grads))


@pytest.mark.parametrize("fn", FNS)
def test_chip_missing_feature_maps(fn):
  with pytest.raises(ValueError, match=r"no feature maps for group 'h1'"):
    fn(_variables(), SPEC, 0.5, importance=ifjax.importance.chip({"h0": np.ones((2, 4), np.float32)}))
