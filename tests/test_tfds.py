"""ifjax.data.tfds_dataset / tfds_batches on tiny datasets written here in the real TFDS on-disk format.

The datasets are made by subclasses of TFDS's own cifar10/cifar100/imagenet2012 builders whose generators yield
a few random images instead of downloading anything, so ``tfds.builder(name, data_dir=tmp)`` finds them prepared
(dataset_info.json, features.json and array_record shards). Needs tensorflow-datasets (the ``test`` extra), not
TensorFlow; the tfrecord test runs only where TensorFlow is installed.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from ifjax import data

tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed: "
                           "pip install -e '.[test]' (or '.[data]') to run the TFDS tests")

N_TRAIN, N_TEST = 37, 11


def prepare(name: str, data_dir, splits: dict[str, list[dict]], file_format: str = "array_record") -> None:
  """Writes ``splits`` (split -> feature dicts) as TFDS dataset ``name`` in ``data_dir`` with TFDS's own writer."""
  base = tfds.builder_cls(name)

  class Local(base, skip_registration=True):
    name = base.name
    # A one-part module name: for a class in a namespace package (tests/) TFDS 4.9.10's code_path needs the
    # importlib_resources backport, which is not installed on Python >= 3.9.
    __module__ = "tfds_local_builder"

    def _split_generators(self, dl_manager):
      return {split: self._examples(split, examples) for split, examples in splits.items()}

    def _examples(self, split, examples):
      for i, example in enumerate(examples):
        yield f"{split}-{i}", example

  Local(data_dir=data_dir, file_format=file_format).download_and_prepare()


def png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 image (TFDS would encode NumPy arrays with TensorFlow, which this test does not need)."""
  from PIL import Image

  out = io.BytesIO()
  Image.fromarray(image).save(out, format="PNG")
  return out.getvalue()


def cifar_splits(seed: int, classes: int, counts=(N_TRAIN, N_TEST)):
  """(splits for :func:`prepare`, {split: (images, labels)}): distinct random uint8 32x32 RGB images."""
  rng = np.random.default_rng(seed)
  splits, arrays = {}, {}
  for split, n in zip(("train", "test"), counts):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, n).astype(np.int32)
    splits[split] = [{"id": f"{split}_{i:05d}", "image": png(im), "label": int(y)}
                     for i, (im, y) in enumerate(zip(images, labels))]
    if classes == 100:
      for example in splits[split]:
        example["coarse_label"] = example["label"] // 5
    arrays[split] = images, labels
  return splits, arrays


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
  """(data_dir, {split: (images, labels)}) of a fake cifar10 with 37 train and 11 test images."""
  data_dir = tmp_path_factory.mktemp("tfds")
  splits, arrays = cifar_splits(0, 10)
  prepare("cifar10", data_dir, splits)
  return data_dir, arrays


def key(image) -> bytes:
  return np.ascontiguousarray(image).tobytes()


def as_pairs(images, labels) -> list[tuple[bytes, int]]:
  """Sorted (image bytes, label) pairs: compares example multisets regardless of order."""
  return sorted((key(im), int(y)) for im, y in zip(images, labels))


def test_prepared_in_tfds_format_without_tensorflow(cifar10):
  data_dir, _ = cifar10
  builder = tfds.builder("cifar10", data_dir=data_dir)
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == N_TRAIN and builder.info.splits["test"].num_examples == N_TEST
  names = {p.name for p in builder.data_path.iterdir()}
  assert {"dataset_info.json", "features.json", "cifar10-train.array_record-00000-of-00001"} <= names
  code = ("import sys, tensorflow_datasets as tfds, ifjax.data as d\n"
          f"x = list(d.tfds_dataset('cifar10', 'test', data_dir={str(data_dir)!r}, download=True))\n"
          f"assert len(x) == {N_TEST}\n"
          "assert 'tensorflow' not in sys.modules")  # download=True on a prepared dataset: nothing to do
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_tfds_dataset_yields_the_prepared_examples(cifar10):
  data_dir, arrays = cifar10
  for split, (images, labels) in arrays.items():
    got = list(data.tfds_dataset("cifar10", split, data_dir=data_dir))
    assert len(got) == len(images)
    assert all(x.shape == (32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64 for x, y in got)
    assert as_pairs(*zip(*got)) == as_pairs(images, labels)
  ds = data.tfds_dataset("cifar10", "train", data_dir=data_dir, batch_size=10)
  got = list(ds)
  assert len(ds) == 4 and [len(x) for x, _ in got] == [10, 10, 10, 7]
  assert all(x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3) and y.dtype == np.int64 for x, y in got)
  flat = list(data.tfds_dataset("cifar10", "train", data_dir=data_dir))  # the same storage order, re-iterable
  np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), np.stack([x for x, _ in flat]))
  assert [key(x) for x, _ in ds] == [key(x) for x, _ in got]
  sub = list(data.tfds_dataset("cifar10", "train[:10]", data_dir=data_dir))
  assert [key(x) for x, _ in sub] == [key(x) for x, _ in flat[:10]]


def batch_keys(batches) -> list[list[bytes]]:
  return [[key(im) for im in x] for x, _ in batches]


def test_tfds_batches_epochs(cifar10):
  data_dir, arrays = cifar10
  images, labels = arrays["train"]
  label_of = {key(im): int(y) for im, y in zip(images, labels)}
  raw = data.tfds_batches("cifar10", "train", batch_size=8, data_dir=data_dir, seed=3)
  assert (raw.steps, len(raw), raw.num_examples) == (4, 4, N_TRAIN)
  epochs = []
  for epoch in range(3):
    got = list(raw(epoch))
    assert len(got) == 4
    for x, y in got:
      assert x.shape == (8, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (8,) and y.dtype == np.int32
      assert [label_of[key(im)] for im in x] == y.tolist()
    seen = [k for b in batch_keys(got) for k in b]
    assert len(set(seen)) == 32 and set(seen) <= set(label_of)  # each example at most once, 5 dropped
    epochs.append(batch_keys(got))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
  assert batch_keys(raw(1)) == epochs[1]  # deterministic: seed and epoch only
  again = data.tfds_batches("cifar10", "train", batch_size=8, data_dir=data_dir, seed=3, prefetch=0, threads=1)
  assert batch_keys(again(2)) == epochs[2]
  other = data.tfds_batches("cifar10", "train", batch_size=8, data_dir=data_dir, seed=4)
  assert batch_keys(other(0)) != epochs[0]
  dropped = [set(label_of) - {k for b in e for k in b} for e in epochs]
  assert all(len(d) == 5 for d in dropped) and len(set.union(*dropped)) > 5

  full = data.tfds_batches("cifar10", "train", batch_size=8, data_dir=data_dir, seed=3, drop_remainder=False)
  got = list(full(0))
  assert full.steps == 5 and [len(x) for x, _ in got] == [8, 8, 8, 8, 5]
  assert as_pairs(np.concatenate([x for x, _ in got]), np.concatenate([y for _, y in got])) == as_pairs(images, labels)

  ordered = data.tfds_batches("cifar10", "train", batch_size=8, data_dir=data_dir, shuffle=False)
  storage = [key(x) for x, _ in data.tfds_dataset("cifar10", "train", data_dir=data_dir)]
  assert [k for b in batch_keys(ordered(0)) for k in b] == storage[:32]
  assert batch_keys(ordered(5)) == batch_keys(ordered(0))


def test_tfds_batches_preprocess(cifar10):
  data_dir, _ = cifar10
  raw = data.tfds_batches("cifar10", "train", batch_size=16, data_dir=data_dir, seed=1)
  pre = data.tfds_batches("cifar10", "train", batch_size=16, data_dir=data_dir, seed=1,
                          preprocess=lambda im: data.preprocess("resnet20", im))
  for (x, y), (xp, yp) in zip(raw(7), pre(7), strict=True):
    assert xp.shape == (16, 32, 32, 3) and xp.dtype == np.float32 and yp.dtype == np.int32
    np.testing.assert_array_equal(xp, data.preprocess("resnet20", x))
    np.testing.assert_array_equal(yp, y)
  bad = data.tfds_batches("cifar10", "train", batch_size=16, data_dir=data_dir, preprocess=lambda im: im[:1])
  with pytest.raises(ValueError, match=r"preprocess must return an array with one row per image \(16\), got \(1, 32"):
    next(bad(0))


def test_tfds_batches_abandoned_iterator(cifar10):
  data_dir, _ = cifar10
  loader = data.tfds_batches("cifar10", "train", batch_size=4, data_dir=data_dir, prefetch=3)
  it = loader(0)
  first = next(it)
  it.close()  # stops reading ahead without hanging
  assert key(next(loader(0))[0]) == key(first[0])


def test_tfds_batches_errors(cifar10, tmp_path):
  data_dir, _ = cifar10
  with pytest.raises(data.DataMissingError, match=rf"'cifar10' is not prepared in {tmp_path}.*tfds_batches\('cifar10', "
                                                  r"'train', data_dir=\.\.\., download=True\)"):
    data.tfds_batches("cifar10", "train", batch_size=8, data_dir=tmp_path)
  with pytest.raises(data.DataMissingError, match="manual_dir=<dir with the ILSVRC-2012 tars>"):
    data.tfds_batches("imagenet2012", "train", batch_size=8, data_dir=tmp_path)
  assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing was downloaded or written
  with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; supported: \['cifar10', 'cifar100', 'imagenet2"):
    data.tfds_batches("mnist", "train", batch_size=8, data_dir=data_dir)
  for kwargs, match in [(dict(batch_size=0), "batch_size must be a positive integer, got 0"),
                        (dict(batch_size=8, seed=-1), "seed must be a non-negative integer, got -1"),
                        (dict(batch_size=8, preprocess="resnet20"), "preprocess must be a callable"),
                        (dict(batch_size=8, prefetch=-1), "prefetch must be a non-negative integer"),
                        (dict(batch_size=8, threads=0), "threads must be a positive integer or None"),
                        (dict(batch_size=38), r"cifar10 'train' in .* has 37 examples: no batch of 38 \(drop_rem")]:
    with pytest.raises(ValueError, match=match):
      data.tfds_batches("cifar10", "train", data_dir=data_dir, **kwargs)
  assert data.tfds_batches("cifar10", "train", batch_size=38, data_dir=data_dir, drop_remainder=False).steps == 1
  loader = data.tfds_batches("cifar10", "train", batch_size=8, data_dir=data_dir)
  with pytest.raises(ValueError, match="epoch must be a non-negative integer, got -1"):
    loader(-1)
  with pytest.raises(ValueError, match="Unknown split 'validation'"):
    data.tfds_batches("cifar10", "validation", batch_size=8, data_dir=data_dir)


def test_import_ifjax_does_not_import_tfds():
  code = ("import sys, ifjax, ifjax.data\n"
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'array_record') if m in sys.modules]\n"
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_cifar100_fine_labels(tmp_path):
  splits, arrays = cifar_splits(1, 100, counts=(12, 3))
  prepare("cifar100", tmp_path, splits)
  images, labels = arrays["train"]
  got = list(data.tfds_batches("cifar100", "train", batch_size=12, data_dir=tmp_path)(0))
  assert len(got) == 1 and as_pairs(*got[0]) == as_pairs(images, labels)  # "label" (fine), not "coarse_label"


def imagenet_examples(seed: int):
  """(feature dicts, JPEG bytes, labels) of 5 smooth random JPEGs of various sizes."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  sizes = [(300, 260), (256, 256), (200, 400), (512, 300), (260, 300)]  # (W, H); 200 and 260 are upscaled
  jpegs, labels = [], rng.choice(1000, len(sizes), replace=False)
  for w, h in sizes:
    out = io.BytesIO()
    smooth = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    smooth.save(out, format="JPEG", quality=90)
    jpegs.append(out.getvalue())
  examples = [{"image": b, "label": int(y), "file_name": f"ILSVRC2012_val_{i:08d}.JPEG"}
              for i, (b, y) in enumerate(zip(jpegs, labels))]
  return examples, jpegs, labels


def test_imagenet2012_resized_and_cropped(tmp_path):
  examples, jpegs, labels = imagenet_examples(2)
  prepare("imagenet2012", tmp_path, {"validation": examples})
  expected = [data._resize_crop(data._decode(b, "jpeg"), 224, 256) for b in jpegs]
  got = list(data.tfds_batches("imagenet2012", "validation", batch_size=5, data_dir=tmp_path, shuffle=False)(0))
  x, y = got[0]
  assert x.shape == (5, 224, 224, 3) and x.dtype == np.uint8 and y.dtype == np.int32
  assert as_pairs(x, y) == as_pairs(expected, labels)
  flat = list(data.tfds_dataset("imagenet2012", "validation", data_dir=tmp_path))
  assert as_pairs(*zip(*flat)) == as_pairs(expected, labels)


def test_tfrecord_needs_tensorflow_and_is_read_by_tfds_dataset(tmp_path, cifar10):
  pytest.importorskip("tensorflow", reason="writing and reading tfrecord shards needs TensorFlow (not in the test "
                      "extra); the array_record path above needs none")
  splits, arrays = cifar_splits(0, 10)
  prepare("cifar10", tmp_path, splits, file_format="tfrecord")
  images, labels = arrays["train"]
  got = list(data.tfds_dataset("cifar10", "train", data_dir=tmp_path))
  assert as_pairs(*zip(*got)) == as_pairs(images, labels)
  batched = list(data.tfds_dataset("cifar10", "train", data_dir=tmp_path, batch_size=10))
  assert [len(x) for x, _ in batched] == [10, 10, 10, 7] and batched[0][1].dtype == np.int64
  with pytest.raises(ValueError, match=r"is prepared as \['tfrecord'\]: convert it with `tfds convert_format "
                                       r"--dataset_version_dir=.*--out_file_format=array_record`"):
    data.tfds_batches("cifar10", "train", batch_size=8, data_dir=tmp_path)
  examples, jpegs, labels = imagenet_examples(3)
  prepare("imagenet2012", tmp_path, {"validation": examples}, file_format="tfrecord")
  got = list(data.tfds_dataset("imagenet2012", "validation", data_dir=tmp_path))  # resized with TensorFlow
  pil = {int(y): data._resize_crop(data._decode(b, "jpeg"), 224, 256) for b, y in zip(jpegs, labels)}
  assert len(got) == 5 and len(pil) == 5
  for x, y in got:
    assert x.shape == (224, 224, 3) and x.dtype == np.uint8
    # TF's JPEG decoder, bicubic + antialias and floor-centered crop vs Pillow's (measured: mean 1.0-1.7, max 8)
    assert np.abs(x.astype(float) - pil[int(y)]).mean() < 3


def test_fit_trains_from_tfds_batches(cifar10):
  """The whole path: a prepared TFDS split -> tfds_batches -> ifjax.train.fit (its steps per epoch feed the
  optimizer factory) -> evaluate on the tfds_dataset test split."""
  import jax
  import jax.numpy as jnp

  import ifjax
  from ifjax import train

  data_dir, arrays = cifar10
  batches = data.tfds_batches("cifar10", "train", batch_size=8, data_dir=data_dir,
                              preprocess=lambda im: data.preprocess("resnet20", im))
  module, _ = ifjax.models.get("mlp")
  variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  steps_seen = []

  def optimizer(steps_per_epoch):
    steps_seen.append(steps_per_epoch)
    return train.paper_sgd("train", steps_per_epoch)

  out, history = train.fit(module, variables, batches, epochs=2, optimizer=optimizer, progress=False)
  assert steps_seen == [N_TRAIN // 8] and len(history) == 2 and np.isfinite(history[-1]["loss"])
  assert not np.allclose(out["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
  images, labels = arrays["test"]
  test = [(data.preprocess("resnet20", x), y) for x, y in data.tfds_dataset("cifar10", "test", data_dir=data_dir,
                                                                              batch_size=4)]
  expected = np.mean(np.argmax(module.apply(out, data.preprocess("resnet20", images)), -1) == labels)
  assert train.evaluate(module, out, test) == pytest.approx(expected)
