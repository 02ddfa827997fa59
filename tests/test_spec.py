"""Group / Spec construction, JSON round trip, paper indexing and validation."""

import json
import re

import numpy as np
import pytest

import ifjax


def _variables():
  """conv0 (3x3, 2 -> 4) + bn0 -> conv1 (3x3, 4 -> 3) -> fc (3 -> 2); deterministic."""
  r = np.random.default_rng(0)
  f = lambda *s: r.normal(size=s).astype(np.float32)
  return {
      "params": {
          "conv0": {"kernel": f(3, 3, 2, 4)},
          "bn0": {"scale": f(4), "bias": f(4)},
          "conv1": {"kernel": f(3, 3, 4, 3), "bias": f(3)},
          "fc": {"kernel": f(3, 2), "bias": f(2)},
      },
      "batch_stats": {"bn0": {"mean": f(4), "var": np.abs(f(4)) + 0.5}},
  }


def _spec(eps=1e-3):
  return ifjax.Spec(
      groups=(
          ifjax.Group("c0", [("params/conv0/kernel", 3)], [("params/conv1/kernel", 2)]),
          ifjax.Group("c1", [("params/conv1/kernel", -1), ("params/conv1/bias", 0, 0)], [("params/fc/kernel", 0)]),
      ),
      batchnorms=[("params/conv0", "batch_stats/bn0", eps)],
  )


# -- construction ----------------------------------------------------------------
def test_members_are_normalised_to_member():
  g = ifjax.Group("g", [("params/a/kernel", 1), ["params/a/bias", 0]], (("params/b/kernel", 0, 2),))
  assert all(type(m) is ifjax.Member for m in g.members)
  assert g.producers == (ifjax.Member("params/a/kernel", 1, 0), ifjax.Member("params/a/bias", 0, 0))
  assert g.consumers == (ifjax.Member("params/b/kernel", 0, 2),)
  assert g.consumers[0].path == "params/b/kernel" and g.consumers[0].axis == 0 and g.consumers[0].offset == 2
  assert g.members == g.producers + g.consumers
  assert isinstance(g.producers, tuple) and isinstance(g.consumers, tuple)


def test_member_numpy_ints_become_python_ints():
  g = ifjax.Group("g", [("params/a/kernel", np.int64(1), np.int32(0))])
  m = g.producers[0]
  assert type(m.axis) is int and type(m.offset) is int
  json.loads(ifjax.Spec([g]).to_json())  # serialisable


def test_member_offset_default_is_zero():
  assert ifjax.Member("p", 1).offset == 0
  m = ifjax.Group("g", [("p", 1)]).producers[0]
  assert (m.path, m.axis, m.offset) == ("p", 1, 0)
  assert m == ifjax.Member("p", 1, 0)


@pytest.mark.parametrize("bad", ["params/a/kernel", ("params/a/kernel",), ("p", 1, 0, 0), (1, 0), ("p", "1"),
                                 ("p", 1.0)])
def test_bad_member_rejected(bad):
  with pytest.raises(ValueError, match="member"):
    ifjax.Group("g", [bad])


def test_negative_offset_rejected():
  with pytest.raises(ValueError, match="offset"):
    ifjax.Group("g", [("p", 0, -1)])


def test_group_needs_name_and_producers():
  with pytest.raises(ValueError, match="name"):
    ifjax.Group("", [("p", 0)])
  with pytest.raises(ValueError, match="no producers"):
    ifjax.Group("g", [], [("p", 0)])


def test_batchnorm_pairs_normalised():
  spec = _spec(eps=1e-3)
  assert spec.batchnorms == (ifjax.BatchNormPair("conv0", "bn0", 1e-3),)
  assert type(spec.batchnorms[0]) is ifjax.BatchNormPair
  # default eps is flax's 1e-5
  assert ifjax.Spec((), batchnorms=[("conv0", "bn0")]).batchnorms[0].eps == 1e-5
  with pytest.raises(ValueError, match="batchnorm"):
    ifjax.Spec((), batchnorms=[("conv0",)])


def test_duplicate_group_names_rejected():
  g = ifjax.Group("dup", [("params/a/kernel", 1)])
  h = ifjax.Group("dup", [("params/b/kernel", 1)])
  with pytest.raises(ValueError, match="duplicate group names.*dup"):
    ifjax.Spec((g, h))


# -- JSON ---------------------------------------------------------------------------
def test_json_round_trip():
  spec = _spec(eps=1e-3)
  text = spec.to_json()
  back = ifjax.Spec.from_json(text)
  assert back == spec
  assert hash(back) == hash(spec)  # usable as a static jit argument
  assert back.batchnorms[0].eps == 1e-3
  assert back.groups[1].producers[1] == ifjax.Member("params/conv1/bias", 0, 0)
  assert back.to_json() == text
  d = json.loads(text)
  assert [g["name"] for g in d["groups"]] == ["c0", "c1"]


def test_json_round_trip_with_offsets_and_no_batchnorms():
  spec = ifjax.Spec((ifjax.Group("a", [("params/x/kernel", 1)], [("params/cat/kernel", 0, 0)]),
                     ifjax.Group("b", [("params/y/kernel", 1)], [("params/cat/kernel", 0, 5)])))
  back = ifjax.Spec.from_json(spec.to_json())
  assert back == spec and back.batchnorms == ()
  assert back["b"].consumers[0].offset == 5


def test_json_eps_distinguishes_specs():
  assert ifjax.Spec.from_json(_spec(1e-3).to_json()) != _spec(1e-5)


# -- paper indexing -----------------------------------------------------------------
def _three():
  return ifjax.Spec(tuple(ifjax.Group(n, [(f"params/{n}/kernel", 1)]) for n in ("first", "mid", "last")))


def test_paper_index():
  spec = _three()
  assert spec.names == ["first", "mid", "last"]
  assert [spec.paper_index(n) for n in spec.names] == [2, 1, 0]
  assert spec[0].name == "last" and spec[2].name == "first"
  assert spec[np.int64(1)].name == "mid"
  assert spec["mid"] is spec.groups[1]


def test_select_order_is_network_order():
  spec = _three()
  assert [g.name for g in spec.select([0, "first"])] == ["first", "last"]
  assert [g.name for g in spec.select(["last", 2, "first"])] == ["first", "last"]
  assert [g.name for g in spec.select(None)] == ["first", "mid", "last"]
  assert [g.name for g in spec.select(1)] == ["mid"]
  assert [g.name for g in spec.select("last")] == ["last"]


def test_bad_group_keys():
  spec = _three()
  with pytest.raises(ValueError, match="out of range"):
    spec[3]
  with pytest.raises(ValueError, match="out of range"):
    spec[-1]
  with pytest.raises(ValueError, match="unknown group 'nope'"):
    spec["nope"]
  with pytest.raises(ValueError, match="unknown group"):
    spec.select(["first", "nope"])
  with pytest.raises(ValueError):
    spec[True]


# -- validate -------------------------------------------------------------------------
def test_validate_returns_sizes():
  v = _variables()
  assert _spec().validate(v) == {"c0": 4, "c1": 3}


def test_widths_equals_validate():
  v = _variables()
  assert ifjax.widths(v, _spec()) == _spec().validate(v) == {"c0": 4, "c1": 3}


def test_validate_does_not_mutate():
  v = _variables()
  before = {k: {m: {a: b.copy() for a, b in d.items()} for m, d in c.items()} for k, c in v.items()}
  _spec().validate(v)
  for c in before:
    for m in before[c]:
      for a in before[c][m]:
        np.testing.assert_array_equal(v[c][m][a], before[c][m][a])


def test_validate_unknown_path():
  spec = ifjax.Spec((ifjax.Group("g", [("params/conv9/kernel", 3)]),))
  with pytest.raises(ValueError, match=re.escape("'params/conv9/kernel'")):
    spec.validate(_variables())


def test_validate_axis_out_of_range_mentions_shape():
  spec = ifjax.Spec((ifjax.Group("g", [("params/fc/kernel", 2)]),))
  with pytest.raises(ValueError, match=r"axis 2.*'params/fc/kernel'.*\(3, 2\)"):
    spec.validate(_variables())
  spec = ifjax.Spec((ifjax.Group("g", [("params/fc/kernel", -3)]),))
  with pytest.raises(ValueError, match=r"\(3, 2\)"):
    spec.validate(_variables())


def test_validate_size_mismatch_names_both_paths_and_sizes():
  # conv0 has 4 outputs, fc has 3 inputs
  spec = ifjax.Spec((ifjax.Group("g", [("params/conv0/kernel", 3)], [("params/fc/kernel", 0)]),))
  with pytest.raises(ValueError, match="disagree") as e:
    spec.validate(_variables())
  msg = str(e.value)
  assert "params/conv0/kernel" in msg and "params/fc/kernel" in msg
  assert "4" in msg and "3" in msg
  assert "'g'" in msg


def test_validate_bias_size_mismatch():
  spec = ifjax.Spec((ifjax.Group("g", [("params/conv0/kernel", 3), ("params/fc/bias", 0)]),))
  with pytest.raises(ValueError, match=r"params/conv0/kernel.*4.*params/fc/bias.*2"):
    spec.validate(_variables())


def _concat_variables():
  r = np.random.default_rng(1)
  f = lambda *s: r.normal(size=s).astype(np.float32)
  return {"params": {"a": {"kernel": f(2, 4)}, "b": {"kernel": f(2, 3)}, "cat": {"kernel": f(7, 5)}}}


def test_validate_concat_segments():
  spec = ifjax.Spec((ifjax.Group("a", [("params/a/kernel", 1)], [("params/cat/kernel", 0, 0)]),
                     ifjax.Group("b", [("params/b/kernel", 1)], [("params/cat/kernel", 0, 4)])))
  assert spec.validate(_concat_variables()) == {"a": 4, "b": 3}


def test_validate_overlapping_concat_segments_rejected():
  spec = ifjax.Spec((ifjax.Group("a", [("params/a/kernel", 1)], [("params/cat/kernel", 0, 0)]),
                     ifjax.Group("b", [("params/b/kernel", 1)], [("params/cat/kernel", 0, 2)])))
  with pytest.raises(ValueError, match=r"overlap") as e:
    spec.validate(_concat_variables())
  assert "'a'" in str(e.value) and "'b'" in str(e.value) and "params/cat/kernel" in str(e.value)


def test_validate_concat_segment_past_the_end_rejected():
  spec = ifjax.Spec((ifjax.Group("a", [("params/a/kernel", 1)], [("params/cat/kernel", 0, 0)]),
                     ifjax.Group("b", [("params/b/kernel", 1)], [("params/cat/kernel", 0, 5)])))
  with pytest.raises(ValueError, match="params/cat/kernel"):
    spec.validate(_concat_variables())


def test_validate_whole_axis_with_offset_rejected():
  # an axis owned by a single group must belong to it whole, so an offset there is an error
  for spec in (ifjax.Spec((ifjax.Group("a", [("params/a/kernel", 1, 1)]),)),
               ifjax.Spec((ifjax.Group("a", [("params/a/kernel", 1)], [("params/cat/kernel", 0, 1)]),))):
    with pytest.raises(ValueError, match="offset 1"):
      spec.validate(_concat_variables())


def test_validate_batchnorm_stats_mismatch():
  v = _variables()
  v["batch_stats"]["bn0"]["mean"] = np.zeros(3, np.float32)  # conv0 has 4 outputs
  with pytest.raises(ValueError, match=r"batch_stats/bn0/mean.*\(3,\).*4") as e:
    _spec().validate(v)
  assert "params/conv0/kernel" in str(e.value)
  v = _variables()
  v["batch_stats"]["bn0"]["var"] = np.ones(5, np.float32)
  with pytest.raises(ValueError, match=r"batch_stats/bn0/var"):
    _spec().validate(v)


def test_validate_batchnorm_missing_stats():
  v = _variables()
  del v["batch_stats"]
  with pytest.raises(ValueError, match="batch_stats/bn0/mean"):
    _spec().validate(v)
  spec = ifjax.Spec(_spec().groups, batchnorms=[("conv7", "bn0")])
  with pytest.raises(ValueError, match="params/conv7/kernel"):
    spec.validate(_variables())
