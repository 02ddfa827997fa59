"""Bad inputs found by probing (issue 10, part 4): each gets a clear error or now works."""

from __future__ import annotations

import io
import re
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifjax
from ifjax import data, models


def _mlp(hidden=(4, 3), seed=0):
  """fc0 (3 -> h0) -> fc1 (h0 -> h1) -> fc2 (h1 -> 2), NumPy float32; groups h0, h1 (paper indices 1, 0)."""
  r = np.random.default_rng(seed)
  sizes = (3, *hidden, 2)
  v = {"params": {f"fc{i}": {"kernel": r.normal(size=(a, b)).astype(np.float32),
                             "bias": r.normal(size=b).astype(np.float32)}
                  for i, (a, b) in enumerate(zip(sizes, sizes[1:]))}}
  spec = ifjax.Spec(tuple(ifjax.Group(f"h{i}", [(f"params/fc{i}/kernel", 1), (f"params/fc{i}/bias", 0)],
                                      [(f"params/fc{i + 1}/kernel", 0)]) for i in range(len(hidden))))
  return v, spec


@pytest.fixture(scope="module")
def resnet20():
  """Random-init ResNet20: (module, hand spec, variables, traced spec)."""
  module, hand = models.get("resnet20")
  x = jnp.zeros((1, 32, 32, 3))
  v = module.init(jax.random.key(0), x)
  return module, hand, v, ifjax.trace_spec(module.apply, v, x)


# -- 1. JSON of traced specs -------------------------------------------------------------------------------
def test_traced_segment_spec_round_trips_through_json(resnet20):
  _, _, v, traced = resnet20
  assert any(g.size is not None for g in traced.groups)  # the option-A stream segments
  again = ifjax.Spec.from_json(traced.to_json())
  assert again == traced
  assert again.validate(v) == traced.validate(v)


def test_numpy_integers_in_members_and_size_serialise():
  g = ifjax.Group("g", [ifjax.Member("params/a/kernel", np.int64(1), np.int64(2))],
                  [ifjax.FlatMember("params/b/kernel", 0, np.int32(0), np.int64(1), 1)], size=np.int64(3))
  assert type(g.size) is int and all(type(x) is int for m in g.members for x in m[1:])
  assert type(g.consumers[0]) is ifjax.FlatMember
  spec = ifjax.Spec((g,))
  assert ifjax.Spec.from_json(spec.to_json()).groups[0].size == 3
  with pytest.raises(ValueError, match="size must be a positive int, got True"):
    ifjax.Group("g", [("params/a/kernel", 1)], size=True)


# -- 2. apply_plan checks the plan against the variables ---------------------------------------------------
def test_plan_for_other_variables_names_the_group():
  v, spec = _mlp((4, 3))
  wide, _ = _mlp((6, 3))
  for fuse in (True, False):
    pl = ifjax.plan(wide, spec, 0.5, fuse=fuse)
    with pytest.raises(ValueError, match=r"plan\['h0'\] does not fit group 'h0', which has 4 neurons in these "
                                         r"variables: its importance has shape \(6,\), expected \(4,\)"):
      ifjax.apply_plan(v, spec, pl)


@pytest.mark.parametrize("edit, message", [
    (lambda gp: gp._replace(keep=np.array([0, 4], np.int32)), r"keep has indices in \[0, 4\], outside \[0, 4\)"),
    (lambda gp: gp._replace(keep=np.array([0.0, 1.0])), r"keep must be a 1-d integer array.*float64"),
    (lambda gp: gp._replace(keep=np.zeros((2, 1), np.int32)), r"keep must be a 1-d integer array, got shape \(2, 1\)"),
    (lambda gp: gp._replace(keep=np.arange(5, dtype=np.int32)), r"keeps 5 neurons, expected 1 to 4"),
    (lambda gp: gp._replace(producer_map=gp.producer_map[:, :3]),
     r"producer_map has shape \(2, 3\), expected \(2, 4\)"),
    (lambda gp: gp._replace(consumer_map=gp.consumer_map[:1]), r"consumer_map has shape \(1, 4\), expected \(2, 4\)"),
    (lambda gp: gp._replace(consumer_map=None), r"needs keep \(pruning\), producer_map and consumer_map"),
    (lambda gp: tuple(gp), r" must be a GroupPlan, got tuple"),
])
def test_malformed_group_plan(edit, message):
  v, spec = _mlp((4, 3))
  pl = ifjax.plan(v, spec, 0.5)
  with pytest.raises(ValueError, match=r"plan\['h0'\].*" + message):
    ifjax.apply_plan(v, spec, {**pl, "h0": edit(pl["h0"])})
  with pytest.raises(ValueError, match=r"plan has group 'h9', which the spec does not have"):
    ifjax.apply_plan(v, spec, {"h9": pl["h0"]})
  with pytest.raises(ValueError, match=r"plan must be a dict"):
    ifjax.apply_plan(v, spec, [pl["h0"]])


def test_checked_apply_plan_still_jits():
  v, spec = _mlp((8, 6))
  opts = dict(solver="sinkhorn", fallback="warn", normalization="barycentric")
  jitted = jax.jit(lambda v: ifjax.intra_fuse(v, spec, 0.5, **opts))(v)
  host = ifjax.intra_fuse(v, spec, 0.5, **opts)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4), jitted, host)
  assert jitted["params"]["fc1"]["kernel"].shape == (4, 3)


# -- 3. Sinkhorn settings and p ----------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [-1.0, 0.0, float("nan"), float("inf"), "0.1", True])
def test_bad_epsilon(epsilon):
  v, spec = _mlp()
  with pytest.raises(ValueError, match="Sinkhorn epsilon must be a finite number > 0, got " + re.escape(repr(epsilon))):
    ifjax.plan(v, spec, 0.5, solver="sinkhorn", epsilon=epsilon)
  with pytest.raises(ValueError, match="Sinkhorn epsilon"):
    ifjax.solve_sinkhorn([(np.ones((2, 2), np.float32), np.ones(2), np.ones(2))], epsilon=epsilon)


@pytest.mark.parametrize("option, value, message", [
    ("threshold", 0.0, "threshold must be a finite number > 0"),
    ("threshold", -1e-3, "threshold must be a finite number > 0"),
    ("max_iterations", 0, "max_iterations must be a positive int, got 0"),
    ("max_iterations", 10.5, "max_iterations must be a positive int, got 10.5"),
])
def test_bad_sinkhorn_settings(option, value, message):
  v, spec = _mlp()
  with pytest.raises(ValueError, match=message):
    ifjax.plan(v, spec, 0.5, solver="sinkhorn", **{option: value})


@pytest.mark.parametrize("p", [0, 0.0, -1.0, float("nan"), "2", True, None])
def test_bad_p(p):
  v, spec = _mlp()
  with pytest.raises(ValueError, match=r"p must be a number with 0 < p <= inf.*got " + re.escape(repr(p))):
    ifjax.plan(v, spec, 0.5, p=p)
  with pytest.raises(ValueError, match=r"p must be a number with 0 < p <= inf"):
    ifjax.pairwise_distance(np.ones((2, 3)), np.ones((2, 3)), p=p)


def test_p_below_one_and_infinity_still_work():
  x, y = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32), np.array([[1.0, 0.0]], np.float32)
  np.testing.assert_allclose(ifjax.pairwise_distance(x, y, p=0.5)[:, 0], [1.0, 1.0])
  np.testing.assert_allclose(ifjax.pairwise_distance(x, y, p=float("inf"))[:, 0], [1.0, 1.0])
  v, spec = _mlp()
  assert ifjax.plan(v, spec, 0.5, p=float("inf"))["h0"].producer_map.shape == (2, 4)


def test_sinkhorn_raise_fallback_is_a_convergence_error():
  v, spec = _mlp((8, 6))
  with pytest.raises(ifjax.ConvergenceError, match=r"group 'h0': sinkhorn OT did not converge") as info:
    ifjax.plan(v, spec, 0.5, solver="sinkhorn", max_iterations=1, threshold=1e-12, fallback="raise")
  assert isinstance(info.value, RuntimeError)  # code catching RuntimeError keeps working


# -- 4. corrupt CIFAR zip ----------------------------------------------------------------------------------
def _cifar_zip(path):
  """A stored (uncompressed) cifar10-jpeg.zip with one 32x32 JPEG per class under test/."""
  from PIL import Image

  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    for c in data.CIFAR10_CLASSES:
      buf = io.BytesIO()
      Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, "JPEG")
      zf.writestr(f"test/{c}/0000.jpg", buf.getvalue())
  return path


def test_corrupt_cifar_zip_names_the_file(tmp_path, monkeypatch):
  monkeypatch.setenv("IFJAX_DATA", str(tmp_path))
  monkeypatch.setenv("IFJAX_CACHE", str(tmp_path / "cache"))
  path = _cifar_zip(tmp_path / "cifar10-jpeg.zip")
  images, labels = data.cifar10_jpeg("test", limit=10)  # the well-formed file reads
  assert images.shape == (10, 32, 32, 3) and labels.tolist() == list(range(10))

  with zipfile.ZipFile(path) as zf:  # one flipped byte inside bird's JPEG: a CRC error on reading it
    info = zf.getinfo("test/bird/0000.jpg")
  raw = bytearray(path.read_bytes())
  start = info.header_offset + 30 + len(info.filename.encode()) + struct.unpack(
      "<H", raw[info.header_offset + 28:info.header_offset + 30])[0]
  raw[start + info.compress_size // 2] ^= 0xFF
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=re.escape(f"{path}: member 'test/bird/0000.jpg' is corrupt (BadZipFile")):
    data.cifar10_jpeg("test", limit=10)

  path.write_bytes(b"not a zip at all")
  with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable zip file (BadZipFile")):
    data.cifar10_jpeg("test", limit=10)


# -- 5. kept_count says what it computes -------------------------------------------------------------------
def test_kept_count_is_the_authors_float_rounding():
  assert ifjax.kept_count(20, 0.9) == 1 and ifjax.kept_count(10, 0.5) == 5
  v, spec = _mlp((10, 3))
  # 10 * (1 - 0.9) = 0.9999999999999998 in floats: int() gives 0, although floor(10 * 0.1) = 1
  with pytest.raises(ValueError, match=re.escape("group 'h0': ratio 0.9 keeps int(10 * (1 - 0.9)) = 0 of 10 "
                                                 "neurons (float arithmetic, as kept_count)")):
    ifjax.plan(v, spec, {"h0": 0.9})


# -- 6. pretrained ResNet32 / 44 from a path ---------------------------------------------------------------
def _torch_zip(path, tensors: dict[str, np.ndarray]):
  """A ``torch.save``-format zip of ``{"state_dict": {key: float32 tensor}}``, written opcode by opcode."""
  u = lambda s: b"X" + struct.pack("<I", len(s.encode())) + s.encode()
  i = lambda n: b"J" + struct.pack("<i", n)
  glob = lambda mod, name: b"c" + f"{mod}\n{name}\n".encode()
  ints = lambda xs: b"(" + b"".join(map(i, xs)) + b"t"
  out = [b"\x80\x02}", u("state_dict"), b"}("]
  storages = {}
  for k, (key, arr) in enumerate(tensors.items()):
    arr = np.ascontiguousarray(arr, np.float32)
    storages[str(k)] = arr.tobytes()
    strides = [s // 4 for s in arr.strides]
    pid = b"(" + u("storage") + glob("torch", "FloatStorage") + u(str(k)) + u("cpu") + i(arr.size) + b"tQ"
    out.append(u(key) + glob("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + i(0) + ints(arr.shape)
               + ints(strides) + b"\x89" + glob("collections", "OrderedDict") + b")RtR")
  out.append(b"us.")
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", b"".join(out))
    for k, b in storages.items():
      zf.writestr(f"archive/data/{k}", b)
  return path


@pytest.mark.parametrize("name", ["resnet32", "resnet44"])
def test_pretrained_deeper_cifar_resnets_from_a_path(tmp_path, name):
  module, _ = models.get(name)
  v = jax.tree.map(np.asarray, module.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3))))
  flat = ifjax._spec.flatten(v)
  layouts = {"conv": (3, 2, 0, 1), "dense": (1, 0), "vector": (0,)}  # Flax -> PyTorch axis order
  tensors = {"module." + key: np.transpose(flat[p], layouts[layout])
             for p, (key, layout) in models.torch_keys(name).items()}
  _, spec, loaded = models.pretrained(name, path=_torch_zip(tmp_path / "w.th", tensors))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), v)
  assert spec.names == models.get(name)[1].names
  files = {"resnet32": "resnet32-d509ac18.th", "resnet44": "resnet44-014dd654.th"}
  assert models.checkpoint_path(name).name == files[name]


def test_pretrained_without_weights_is_a_value_error(tmp_path):
  with pytest.raises(ValueError, match=r"no pretrained weights for 'vgg11_bn'; models with some: \[.*'resnet32'"):
    models.pretrained("vgg11_bn", path=tmp_path / "w.th")
  with pytest.raises(FileNotFoundError, match=r"resnet44: no checkpoint at .*missing\.th; put the file there, "
                                              r"pass path="):
    models.pretrained("resnet44", path=tmp_path / "missing.th")


# -- 7. hand and traced specs: match_groups ----------------------------------------------------------------
def test_match_groups_carries_plans_and_widths_across(resnet20):
  module, hand, v, traced = resnet20
  names = ifjax.match_groups(traced, hand)
  assert {k: names[k] for k in ("stem_conv", "layer2_0/conv2[0:8]", "layer3_0/conv2[48:64]")} == {
      "stem_conv": "stream1", "layer2_0/conv2[0:8]": "stream2a", "layer3_0/conv2[48:64]": "stream3b"}
  assert sorted(names.values()) == sorted(hand.names) and ifjax.match_groups(hand, traced) == {
      b: a for a, b in names.items()}
  pl = ifjax.plan(v, traced, 0.5, groups=["stem_conv", "layer2_0/conv2[24:32]", "layer1_1/conv1"])
  carried = {names[k]: gp for k, gp in pl.items()}
  small = ifjax.apply_plan(v, hand, carried)
  jax.tree.map(np.testing.assert_array_equal, small, ifjax.apply_plan(v, traced, pl))
  w = ifjax.widths(v, hand, carried)
  assert (w["stream1"], w["stream2b"], w["layer1_1/conv1"]) == (8, 4, 8)
  small_module, _ = models.get("resnet20", widths=w)
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  assert small_module.apply(small, x).shape == (2, 10)


def test_match_groups_errors(resnet20):
  _, hand, _, traced = resnet20
  with pytest.raises(ValueError, match=r"spec_a group 'layer3_0/conv2\[48:64\]' has no counterpart: no group of the "
                                       r"other spec shares a member"):
    ifjax.match_groups(traced, ifjax.Spec(hand.groups[:-1], hand.batchnorms))
  g = hand["stream1"]
  partial = ifjax.Spec(tuple(ifjax.Group(h.name, h.producers, h.consumers[:-1], h.size) if h is g else h
                             for h in hand.groups), hand.batchnorms)
  with pytest.raises(ValueError, match=r"spec_b group 'stream1' has no counterpart; the closest, 'stem_conv', differs "
                                       r"in \[\] \(only in 'stream1'\) and \[\('params/fc/kernel', 0, 24, 1, 1\)\]"):
    ifjax.match_groups(traced, partial)
  swapped = ifjax.Spec((ifjax.Group("a", [("params/x", 0)], [("params/y", 0)]),))
  with pytest.raises(ValueError, match="has the members of 'b', but splits them into producers and consumers"):
    ifjax.match_groups(swapped, ifjax.Spec((ifjax.Group("b", [("params/y", 0)], [("params/x", 0)]),)))


def test_match_groups_normalises_negative_axes_with_variables():
  v, spec = _mlp()
  negative = ifjax.Spec(tuple(ifjax.Group(f"n{g.name}", [(m.path, -1 if m.axis == 1 else m.axis) for m in g.producers],
                                          g.consumers) for g in spec.groups))
  with pytest.raises(ValueError, match="no counterpart"):
    ifjax.match_groups(spec, negative)
  assert ifjax.match_groups(spec, negative, v) == {"h0": "nh0", "h1": "nh1"}


# -- 8. importance dicts keyed by paper index --------------------------------------------------------------
def test_importance_keyed_by_paper_index():
  v, spec = _mlp((4, 3))
  s0, s1 = np.array([4.0, 1.0, 3.0, 2.0], np.float32), np.array([1.0, 3.0, 2.0], np.float32)
  by_name = ifjax.plan(v, spec, {"h0": 0.5, 0: 0.3}, importance={"h0": s0, "h1": s1})
  by_index = ifjax.plan(v, spec, {1: 0.5, "h1": 0.3}, importance={1: s0, 0: s1})
  assert by_name["h0"].keep.tolist() == [0, 2] and by_name["h1"].keep.tolist() == [1, 2]
  jax.tree.map(np.testing.assert_array_equal, by_index, by_name)
  with pytest.raises(ValueError, match=r"importance=\{\.\.\.\} gives group 'h1' twice \(keys 'h1' and 0\)"):
    ifjax.plan(v, spec, 0.5, importance={"h1": s1, 0: s1, "h0": s0})
  with pytest.raises(ValueError, match=r"ratio=\{\.\.\.\} gives group 'h0' twice \(keys 1 and 'h0'\)"):
    ifjax.plan(v, spec, {1: 0.5, "h0": 0.25})
  with pytest.raises(ValueError, match=r"importance=\{\.\.\.\}: paper group index 2 out of range"):
    ifjax.plan(v, spec, 0.5, importance={2: s0})
  with pytest.raises(ValueError, match=r"importance=\{\.\.\.\}: unknown group 'h7'"):
    ifjax.plan(v, spec, 0.5, importance={"h7": s0})


# -- 9. models.get(widths=...) with NumPy integers ---------------------------------------------------------
def test_zoo_widths_accept_numpy_integers():
  module, spec = models.get("lenet5", widths={"conv1": np.int64(8), "linear1": np.int32(20)})
  assert dict(module.widths) == {"conv1": 8, "linear1": 20} and all(type(w) is int for _, w in module.widths)
  v = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert spec.validate(v) == {"conv1": 8, "conv2": 64, "linear1": 20}
  for bad in (True, 0, np.int64(-3), 8.0, "8"):
    with pytest.raises(ValueError, match="widths must be positive ints"):
      models.get("lenet5", widths={"conv1": bad})


# -- 10. preprocess constants ------------------------------------------------------------------------------
def test_preprocess_constants():
  x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(data.preprocess("resnet20", x, mean=0, std=1, scale=1), x.astype(np.float32))
  np.testing.assert_array_equal(data.preprocess(None, x, scale=1), x.astype(np.float32))
  mean, std = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)  # pixel-unit constants (e.g. Caffe-style models)
  np.testing.assert_allclose(data.preprocess(None, x, mean=mean, std=std, scale=1), (x - np.array(mean)) / std,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(data.preprocess("resnet20", x, mean=0.5, std=0.5), x / 127.5 - 1, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(data.preprocess("resnet20", x, scale=255),
                                data.preprocess("resnet20", x))  # defaults unchanged
  assert data.black_pixel("resnet20", mean=0.5, std=0.5) == (-1.0,)
  assert data.black_pixel("resnet20") == tuple(-np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(std=0), r"std must be finite and > 0, got 0"),
    (dict(std=(1.0, -1.0, 1.0)), r"std must be finite and > 0"),
    (dict(mean=(0.1, 0.2)), r"mean must be a number or 3 numbers \(one per channel\), got \(0.1, 0.2\)"),
    (dict(mean=float("nan")), r"mean must be finite, got nan"),
    (dict(mean="0.5"), r"mean must be a number or 3 numbers"),
    (dict(scale=0), r"scale must be a finite number > 0 \(images are divided by it\), got 0"),
    (dict(scale=float("inf")), r"scale must be a finite number > 0"),
])
def test_preprocess_bad_constants(kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.preprocess("resnet20", np.zeros((1, 32, 32, 3), np.uint8), **kwargs)


def test_preprocess_without_a_model_checks_layout():
  with pytest.raises(ValueError, match=r"expected images of shape \(N, H, W, C\) \(NHWC\), got \(32, 32, 3\)"):
    data.preprocess(None, np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"the model expects float images in \[0, 255\]"):
    data.preprocess(None, np.full((1, 4, 4, 3), 300.0))


# == issue 22, item 5 ======================================================================================
# -- 1. checkpoint paths orbax would read as glob patterns --------------------------------------------------
@pytest.mark.parametrize("name", ["run[1]", "a]b", "back\\slash", "dir[0]/run"])
def test_save_refuses_paths_orbax_would_glob(tmp_path, name):
  from ifjax._save import write_tree

  v, spec = _mlp()
  with pytest.raises(ifjax.CheckpointError, match=r"save: path=.*orbax reads as a glob pattern.*without '\[', "
                                                  r"'\]' or '\\'"):
    ifjax.save(tmp_path / name, v, spec)
  with pytest.raises(ifjax.CheckpointError, match=r"write_tree: path=.*glob pattern"):
    write_tree(tmp_path / name, {"w": np.ones(3)}, {})
  assert list(tmp_path.iterdir()) == []  # nothing half-written
  with pytest.raises(TypeError, match="path must be a str or os.PathLike path, got int"):
    write_tree(3, {"w": np.ones(3)}, {})


def test_save_under_a_bracketed_working_directory_is_refused(tmp_path, monkeypatch):
  v, spec = _mlp()
  (tmp_path / "w[1]").mkdir()
  monkeypatch.chdir(tmp_path / "w[1]")
  with pytest.raises(ifjax.CheckpointError, match=r"save: path='m'.*w\[1\]/m.*contains '\[' and '\]'"):
    ifjax.save("m", v, spec)


# -- 2. allocate targets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["target_params", "target_flops"])
@pytest.mark.parametrize("target", [float("nan"), float("inf"), -0.5, 0, np.float32("nan")])
def test_allocate_refuses_non_finite_and_non_positive_targets(what, target):
  v, spec = _mlp()
  extra = {} if what == "target_params" else {"rebuild": lambda w: None, "example_args": (np.ones((1, 3)),)}
  with pytest.raises(ValueError, match=rf"allocate: {what} must be a finite number > 0 .*got"):
    ifjax.allocate(v, spec, **{what: target}, **extra)


def test_allocate_takes_a_numpy_target():
  v, spec = _mlp((6, 5))
  assert ifjax.allocate(v, spec, target_params=np.float64(0.6)) == ifjax.allocate(v, spec, target_params=0.6)
  assert ifjax.allocate(v, spec, target_params=np.int64(40)) == ifjax.allocate(v, spec, target_params=40)


# -- 7. library errors that name the argument -----------------------------------------------------------------
@pytest.mark.parametrize("text, error, message", [
    ("{", ValueError, r"Spec.from_json: text is not valid JSON"),
    ("[]", ValueError, r"Spec.from_json: text must be a JSON object with a 'groups' list"),
    ('{"groups": 3}', ValueError, r"with a 'groups' list"),
    ('{"groups": [3]}', ValueError, r"groups\[0\] must be an object with 'name' and 'producers', got 3"),
    ('{"groups": [{"name": "a"}]}', ValueError, r"groups\[0\] lacks 'producers'"),
    ('{"groups": [{"producers": []}]}', ValueError, r"groups\[0\] lacks 'name'"),
    ('{"groups": [{"name": "a", "producers": 5}]}', ValueError, r"groups\[0\] \('a'\): producers must be a list"),
    ('{"groups": [{"name": "a", "producers": [["p", "x"]]}]}', ValueError,
     r"groups\[0\] \('a'\): a group member must be \(str path, int axis"),
    ('{"groups": [{"name": 7, "producers": [["p", 1]]}]}', ValueError, r"group name must be a non-empty string"),
    ('{"groups": [], "batchnorms": [5]}', ValueError, r"batchnorms must be a list of \[layer, bn\(, eps\)\] lists"),
    ('{"groups": [], "batchnorms": [["a", "b", "x"]]}', ValueError, r"Spec.from_json: could not convert"),
    (3, TypeError, r"Spec.from_json: text must be a JSON str, got int"),
])
def test_spec_from_json_names_what_is_malformed(text, error, message):
  with pytest.raises(error, match=message):
    ifjax.Spec.from_json(text)


def test_fuse_models_weights_that_are_not_numbers():
  v, spec = _mlp()
  for weights in ("abc", {"a": 1.0}, [0.5, "x"], [[0.5], [0.5, 0.0]]):
    with pytest.raises(TypeError, match=r"fuse_models: weights must be 2 numbers, one per model, got"):
      ifjax.fuse_models([v, v], spec, weights=weights)
  with pytest.raises(ValueError, match=r"fuse_models: weights must sum to 1"):
    ifjax.fuse_models([v, v], spec, weights=[0.5, 0.6])


def test_split_data_folds_types():
  from ifjax import split_data

  with pytest.raises(TypeError, match=r"folds: n \(the number of examples\) must be an int, got float 10.0"):
    split_data.folds(10.0, 2)
  for k in (2.0, True, "2"):
    with pytest.raises(TypeError, match=r"folds: the fold count k must be an int >= 2, got"):
      split_data.folds(10, k)
  with pytest.raises(split_data.SplitDataError, match=r"k must be an int >= 2, got 1"):
    split_data.folds(10, 1)
  # 8. NumPy / JAX integers are fold counts
  assert [f.tolist() for f in split_data.folds(np.int64(6), np.int64(2))] == [f.tolist() for f in
                                                                             split_data.folds(6, 2)]
  assert split_data.subsets(jnp.int32(4)) == split_data.subsets(4)
  images, labels = np.arange(8.0)[:, None], np.arange(8)
  assert len(split_data.split((images, labels), np.int64(2))) == 2


def test_measure_sensitivity_ratios_are_checked():
  v, spec = _mlp()
  apply = lambda v, x: x @ v["params"]["fc0"]["kernel"] @ v["params"]["fc1"]["kernel"] @ v["params"]["fc2"]["kernel"]
  x = np.ones((4, 3), np.float32)
  for ratios in ([float("nan")], [0.5, float("nan")], [float("inf")], []):
    with pytest.raises(ValueError, match=r"measure_sensitivity: ratios must be non-empty and in \(0, 1\) \(finite"):
      ifjax.measure_sensitivity(apply, v, spec, x, ratios=ratios, recalibrate=False, progress=False)
  for ratios in ("0.5", 0.5, [0.5, "x"], [True]):
    with pytest.raises(TypeError, match=r"measure_sensitivity: ratios must be"):
      ifjax.measure_sensitivity(apply, v, spec, x, ratios=ratios, recalibrate=False, progress=False)


def test_bn_sensitivity_refuses_a_negative_variance():
  v, spec = _mlp()
  spec = ifjax.Spec(spec.groups, (("fc0", "bn0"),))
  v = {**v, "batch_stats": {"bn0": {"mean": np.zeros(4, np.float32), "var": np.array([1, 1, -0.5, 1], np.float32)}}}
  with pytest.raises(ValueError, match=r"bn_sensitivity: variables\['batch_stats/bn0/var'\] must hold finite, "
                                       r"non-negative BatchNorm running variances, got -0.5 at channel 2"):
    ifjax.bn_sensitivity(v, spec)


# -- 8. NumPy / JAX scalar ratios -----------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [jnp.float32(0.5), np.float32(0.5), np.float64(0.5), np.array(0.5),
                                   {"h0": jnp.float32(0.5), "h1": np.float16(0.5)}])
def test_numpy_and_jax_scalar_ratios(ratio):
  v, spec = _mlp((4, 4))
  for fn in (ifjax.intra_fuse, ifjax.prune):
    ref, out = fn(v, spec, 0.5), fn(v, spec, ratio)
    assert ifjax.widths(out, spec) == {"h0": 2, "h1": 2}
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
      np.testing.assert_array_equal(a, b)
  pl = ifjax.plan(v, spec, ratio)
  assert {k: p.m for k, p in pl.items()} == {"h0": 2, "h1": 2}


@pytest.mark.parametrize("ratio", [True, np.bool_(True), jnp.array(True), "0.5", [0.5], jnp.array([0.5])])
def test_bools_and_non_scalars_are_still_not_ratios(ratio):
  v, spec = _mlp()
  with pytest.raises(TypeError, match="ratio"):
    ifjax.intra_fuse(v, spec, ratio)


def test_a_traced_ratio_is_refused_by_name():
  v, spec = _mlp()
  with pytest.raises(TypeError, match=r"ratio must be a concrete number, got a traced value"):
    jax.jit(lambda r: ifjax.plan(v, spec, r, solver="sinkhorn"))(0.5)
