"""Training and evaluation on optax, data-parallel with ``jax.sharding`` (no ``pmap``).

* :func:`init_state` -> :class:`TrainState` (params, batch_stats, opt_state, step), a pytree.
* :func:`make_step` -> a jitted ``(state, images, labels, key) -> (state, metrics)``. With a
  ``mesh`` the batch is split over ``data_axis`` and the state replicated; the step is one
  global program, so the compiler inserts the gradient all-reduce and BatchNorm sees the
  statistics of the whole global batch (the result equals the single-device step up to
  float reassociation). With ``model_axis`` the state carries a leading axis of k models
  that train side by side on their own batches with no traffic between them (Split-Data).
* :func:`fit` / :func:`fit_many` run epochs with a progress bar, optional evaluation and
  resumable orbax checkpoints; :func:`evaluate` gives top-1 accuracy.
* The paper's recipe: SGD with momentum 0.9, lr ``base * 0.5 ** floor(epoch / 30)``
  (base 0.05 to train, 0.01 to fine-tune; :func:`paper_sgd`), flip + random crop
  (:func:`flip_crop`), batch 128, cross-entropy.

Multi-host: call ``jax.distributed.initialize(...)`` first in every process, build the mesh
over ``jax.devices()`` (all processes' devices) and give every process the same global
batches; each process then feeds only the shards its devices hold (see :func:`shard`).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ifjax._mesh import TrainingError, _check_batch, make_mesh, shard, shardings  # noqa: F401 (public here)

Batches = Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]
TrainData = tuple[np.ndarray, np.ndarray] | Batches
Augment = Callable[[jax.Array, jax.Array], jax.Array]


class TrainState(NamedTuple):
  """Everything a training step reads and writes.

  Attributes:
    params: the ``params`` collection.
    batch_stats: the ``batch_stats`` collection (``{}`` for models without BatchNorm).
    opt_state: the optax state of ``params``.
    step: () int32, the number of steps taken (with ``model_axis``: (k,)).
  """

  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array


# -- state ------------------------------------------------------------------------------------------
def init_state(module, variables: Mapping[str, Any], optimizer: optax.GradientTransformation) -> TrainState:
  """A fresh :class:`TrainState` for ``variables`` (``module`` is accepted for symmetry; shapes come from
  the variables)."""
  del module
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TrainingError(f"variables must be a Flax variables dict with 'params', got {type(variables).__name__}")
  params = variables["params"]
  return TrainState(params, variables.get("batch_stats", {}), optimizer.init(params), jnp.zeros((), jnp.int32))


def state_variables(state: TrainState) -> dict:
  """The Flax variables of a state: ``{"params": ..., "batch_stats": ...}`` (no empty collections)."""
  out = {"params": state.params}
  if jax.tree_util.tree_leaves(state.batch_stats):
    out["batch_stats"] = state.batch_stats
  return out


def stack(trees: Sequence[Any]) -> Any:
  """k pytrees of equal structure -> one pytree with a leading axis of k."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any) -> list[Any]:
  """Inverse of :func:`stack`."""
  k = jax.tree_util.tree_leaves(tree)[0].shape[0]
  return [jax.tree_util.tree_map(lambda x, i=i: x[i], tree) for i in range(k)]


# -- the paper's recipe ----------------------------------------------------------------------------
PAPER_BASE_LR = {"train": 0.05, "finetune": 0.01}


def paper_schedule(base_lr: float, steps_per_epoch: int, every: int = 30, factor: float = 0.5) -> optax.Schedule:
  """``base_lr * factor ** floor(epoch / every)``, as a function of the step.

  >>> s = paper_schedule(0.05, steps_per_epoch=10)
  >>> [round(float(s(step)), 6) for step in (0, 299, 300, 600)]
  [0.05, 0.05, 0.025, 0.0125]
  """
  if steps_per_epoch < 1:
    raise TrainingError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
  return optax.exponential_decay(base_lr, every * steps_per_epoch, factor, staircase=True)


def paper_sgd(phase: str = "train", steps_per_epoch: int = 391, momentum: float = 0.9,
              weight_decay: float = 0.0, every: int = 30) -> optax.GradientTransformation:
  """SGD, momentum 0.9, lr 0.05 (``"train"``) or 0.01 (``"finetune"``) halved every 30 epochs.

  The paper gives no weight decay (the authors' training loop has none); ``weight_decay`` adds
  coupled L2 as PyTorch's SGD does. ``every`` (epochs between halvings) compresses the schedule for
  shorter runs: ``every=E // 10`` gives an E-epoch run the ten halvings of the paper's 300 epochs.
  """
  if phase not in PAPER_BASE_LR:
    raise TrainingError(f"phase must be one of {sorted(PAPER_BASE_LR)}, got {phase!r}")
  sgd = optax.sgd(paper_schedule(PAPER_BASE_LR[phase], steps_per_epoch, every), momentum=momentum)
  return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd


def flip_crop(pad: int = 4, fill: float | Sequence[float] = 0.0) -> Augment:
  """``(key, images (B, H, W, C)) -> images``: random horizontal flip, then a random H x W crop of the
  image padded by ``pad`` on each side with ``fill`` (per channel; for preprocessed inputs pass the
  normalised value of a black pixel, ``-mean / std``, to match torchvision's zero padding)."""

  def augment(key: jax.Array, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    k_flip, k_y, k_x = jax.random.split(key, 3)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    value = jnp.broadcast_to(jnp.asarray(fill, images.dtype), (c,))
    padded = jnp.pad(images - value, ((0, 0), (pad, pad), (pad, pad), (0, 0))) + value
    dy = jax.random.randint(k_y, (b,), 0, 2 * pad + 1)
    dx = jax.random.randint(k_x, (b,), 0, 2 * pad + 1)
    return jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(padded, dy, dx)

  return augment


# -- one step ---------------------------------------------------------------------------------------
def _apply_train(module, params, batch_stats, images):
  """Train-mode logits and the new batch statistics."""
  if jax.tree_util.tree_leaves(batch_stats):
    logits, new = module.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                               mutable=["batch_stats"])
    return logits, new["batch_stats"]
  return module.apply({"params": params}, images, train=True), batch_stats


def _step_fn(module, optimizer, augment: Augment | None):
  def step(state: TrainState, images, labels, key):
    if augment is not None:
      images = augment(key, images)

    def loss_fn(params):
      logits, batch_stats = _apply_train(module, params, state.batch_stats, images)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
      return loss, (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return TrainState(params, batch_stats, opt_state, state.step + 1), {"loss": loss, "accuracy": accuracy}

  return step


def make_step(module, optimizer: optax.GradientTransformation, mesh: Mesh | None = None, data_axis: str = "data",
              *, model_axis: str | None = None, augment: Augment | None = None, donate: bool = False):
  """A jitted training step ``(state, images, labels, key) -> (state, {"loss", "accuracy"})``.

  Args:
    module: a flax.linen module called as ``module.apply(v, x, train=True)``.
    optimizer: an optax transformation.
    mesh: None (one device), or a mesh with ``data_axis`` (and ``model_axis``): the batch is
      sharded over ``data_axis``; the state is replicated over it.
    data_axis: the mesh axis the batch is split over.
    model_axis: train k models at once: every leaf of ``state`` has a leading (k,) axis, images are
      (k, B, H, W, C) and labels (k, B); model i uses ``jax.random.split(key, k)[i]``. On a mesh this
      axis is sharded over ``model_axis``, so each model lives on its own devices and nothing is
      exchanged between models.
    augment: ``(key, images) -> images`` applied inside the step (e.g. :func:`flip_crop`).
    donate: donate the input state's buffers (the caller must not reuse it).

  Metrics are means over the (global) batch, per model with ``model_axis``.
  """
  step = _step_fn(module, optimizer, augment)
  if model_axis is not None:
    step = _many_models(step, mesh, model_axis)
  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  state_sh, batch_sh = shardings(mesh, data_axis, model_axis)
  replicated = NamedSharding(mesh, P())

  def checked(state, images, labels, key):
    _check_batch(images, labels, mesh, data_axis, model_axis)
    return jitted(state, images, labels, key)

  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, batch_sh, replicated),
                   out_shardings=(state_sh, state_sh if model_axis else replicated), donate_argnums=donate_argnums)
  return checked


def _many_models(one, mesh: Mesh | None, model_axis: str):
  """The step of one model -> the step of k stacked models. Inside a device group the models' steps are
  unrolled one after the other in the program (measured on XLA:CPU with ResNet20: ``vmap`` turns every conv
  into a grouped conv with the models as groups, and ``lax.map`` puts the convs in a loop; both ran 20-40x
  slower). On a mesh, ``shard_map`` over ``model_axis`` alone gives every group of devices its own models,
  while the batch inside a group stays split over the data axis by the compiler."""

  def local(state, images, labels, keys):
    args = (state, images, labels, keys)
    return stack([one(*jax.tree_util.tree_map(lambda x, i=i: x[i], args)) for i in range(images.shape[0])])

  def step(state, images, labels, key):
    keys = jax.random.split(key, images.shape[0])
    if mesh is None:
      return local(state, images, labels, keys)
    spec = P(model_axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec),
                         axis_names={model_axis})(state, images, labels, keys)

  return step


# -- evaluation --------------------------------------------------------------------------------------
def evaluate(module, variables: Mapping[str, Any], data, mesh: Mesh | None = None, *, batch_size: int = 500,
             data_axis: str = "data") -> float:
  """Top-1 accuracy (a fraction) of ``module`` in eval mode on ``data`` = ``(images, labels)`` arrays or an
  iterable of such batches. The last partial batch is padded and masked, so one program serves all."""
  count, correct = 0, 0
  predict = _predict_fn(module, mesh, data_axis)
  size = batch_size if mesh is None else -(-batch_size // mesh.shape[data_axis]) * mesh.shape[data_axis]
  batch_sh = None if mesh is None else NamedSharding(mesh, P(data_axis))
  for images, labels in _eval_batches(data, batch_size):
    n = len(labels)
    padded = np.zeros((max(size, n), *np.shape(images)[1:]), np.asarray(images).dtype)
    padded[:n] = images
    pred = np.asarray(jax.device_get(predict(variables, shard(padded, batch_sh))))[:n]
    correct += int(np.sum(pred == np.asarray(labels)))
    count += n
  if count == 0:
    raise TrainingError("evaluate: the data has no examples")
  return correct / count


@functools.lru_cache(maxsize=64)
def _predict_fn(module, mesh: Mesh | None, data_axis: str):
  """One jitted predictor per (module, mesh): repeated evaluations (every epoch) compile once."""

  def predict(variables, images):
    return jnp.argmax(module.apply(variables, images, train=False), -1)

  if mesh is None:
    return jax.jit(predict)
  return jax.jit(predict, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P(data_axis))),
                 out_shardings=NamedSharding(mesh, P()))


def _eval_batches(data, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
    images, labels = data
    if len(images) != len(labels):
      raise TrainingError(f"{len(images)} images but {len(labels)} labels")
    for i in range(0, len(images), batch_size):
      yield images[i:i + batch_size], labels[i:i + batch_size]
  else:
    yield from data


# -- fit -------------------------------------------------------------------------------------------
class _Data:
  """Per-epoch batches of one training set: arrays (shuffled by ``(seed, epoch)``, remainder dropped) or a
  callable ``epoch -> iterable of (images, labels)``."""

  def __init__(self, data: TrainData, batch_size: int, seed: int, what: str = "train_data"):
    if not isinstance(batch_size, int) or batch_size < 1:
      raise TrainingError(f"batch_size must be a positive int, got {batch_size!r}")
    self.batch_size, self.seed, self.fn, self.what = batch_size, seed, None, what
    if callable(data):  # e.g. ifjax.data.tfds_batches, which knows its steps per epoch
      self.fn, self.steps = data, getattr(data, "steps", None)
      return
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
      raise TrainingError(f"{what} must be (images, labels) arrays or a callable epoch -> batches, "
                          f"got {type(data).__name__}")
    self.images, self.labels = data
    if len(self.images) != len(self.labels):
      raise TrainingError(f"{what}: {len(self.images)} images but {len(self.labels)} labels")
    if len(self.images) == 0:
      raise TrainingError(f"{what} is empty")
    self.steps = len(self.images) // batch_size
    if self.steps == 0:
      raise TrainingError(f"{what} has {len(self.images)} examples, fewer than one batch of {batch_size}")
    bad = _first_non_finite(self.images)
    if bad is not None:
      raise TrainingError(f"{what}: the images hold NaN or inf (first in example {bad}); every loss would be NaN")

  def check_labels(self, classes: int | None):
    """Refuses labels outside ``[0, classes)`` (array data, before any training)."""
    if self.fn is None:
      _check_labels(self.labels, classes, f"{self.what}: labels")

  def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if self.fn is not None:
      yield from self.fn(epoch)
      return
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
    for i in range(cast(int, self.steps)):  # array data: a number of steps
      idx = np.sort(order[i * self.batch_size:(i + 1) * self.batch_size])
      yield self.images[idx], self.labels[idx]


def _first_non_finite(images, chunk: int = 4096) -> int | None:
  """The index of the first example of a float array holding NaN or inf, or None (chunked: no full-size copy)."""
  images = np.asarray(images) if not hasattr(images, "dtype") else images
  if not np.issubdtype(images.dtype, np.inexact):
    return None
  for i in range(0, len(images), chunk):
    ok = np.isfinite(np.asarray(images[i:i + chunk])).reshape(len(images[i:i + chunk]), -1).all(axis=1)
    if not ok.all():
      return i + int(np.argmin(ok))
  return None


def _check_labels(labels, classes: int | None, what: str):
  """Integer class labels in ``[0, classes)`` (``classes`` None: only ``>= 0``)."""
  labels = np.asarray(labels)
  if labels.size == 0:
    return
  if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
    if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
      raise TrainingError(f"{what} must be integer class indices, got dtype {labels.dtype}")
  lo, hi = labels.min(), labels.max()
  if lo < 0 or (classes is not None and hi >= classes):
    where = int(np.argmax((labels < 0) | ((labels >= classes) if classes is not None else False)))
    span = f"[0, {classes})" if classes is not None else ">= 0"
    raise TrainingError(f"{what} must be class indices in {span} (the model has {classes} outputs), got "
                        f"{labels.reshape(-1)[where]} (labels span {lo} to {hi}); the loss of such a label is NaN")


def _num_classes(module, variables, images) -> int | None:
  """The number of logits ``module`` gives for one example of ``images`` (shapes only), or None if unknown."""
  try:
    x = np.asarray(images[:1])
    out = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables,
                         jax.ShapeDtypeStruct(x.shape, x.dtype))
  except Exception:  # noqa: BLE001 (only a probe: the training step reports real errors itself)
    return None
  return int(out.shape[-1]) if isinstance(out, jax.ShapeDtypeStruct) and out.ndim >= 1 else None


def fit(module, variables: Mapping[str, Any], train_data: TrainData, *, epochs: int, optimizer,
        mesh: Mesh | None = None, eval_data=None, checkpoint_dir=None, progress: bool = True, batch_size: int = 128,
        seed: int = 0, augment: Augment | None = None, data_axis: str = "data", desc: str = "train",
        checkpoint_every: int = 1, time_limit: float | None = None,
        allow_optimizer_change: bool = False) -> tuple[dict, list[dict]]:
  """Trains ``module`` from ``variables`` for ``epochs`` epochs; returns ``(variables, history)``.

  Args:
    module: a flax.linen module called as ``module.apply(v, x, train=True)`` (see :func:`make_step`).
    variables: its starting variables.
    train_data: ``(images, labels)`` arrays (images already preprocessed; shuffled per epoch with
      ``(seed, epoch)``, the last partial batch dropped) or a callable ``epoch -> iterable of (images,
      labels)`` batches (e.g. :func:`ifjax.data.tfds_batches`).
    optimizer: an optax transformation, or a callable ``steps_per_epoch -> transformation`` (e.g.
      ``functools.partial(paper_sgd, "train")``; needs the steps per epoch: array data, or a batch callable
      with a ``steps`` attribute such as :func:`ifjax.data.tfds_batches`).
    epochs: epochs in all (a resume runs those after the saved epoch).
    mesh: data-parallel over ``data_axis`` (see :func:`make_step`).
    eval_data: evaluated after every epoch (``eval_accuracy`` in the history).
    checkpoint_dir: every ``checkpoint_every`` epochs, after the last one and when stopping early, the
      state, history and epoch are saved there (orbax); a new call with the same directory resumes after
      the last saved epoch and gives the same result as an uninterrupted run. A resume refuses (``TrainingError``)
      other ``batch_size`` / ``seed`` settings, an optimizer whose updates differ (another optimizer, learning
      rate or schedule, compared on a probe gradient at a range of step counts) and ``epochs`` below the saved
      epoch. The path must not contain ``[``, ``]`` or a backslash (orbax would save no arrays).
    allow_optimizer_change: resume from a checkpoint written with another optimizer or learning rate on purpose
      (the saved optimizer state must still fit the new optimizer).
    time_limit: seconds; the first epoch that ends later than this after the call began is the last one
      run (so a job fits a wall-clock allowance; with ``checkpoint_dir`` a later call continues).
    progress: a tqdm bar with the running loss and accuracy.
    batch_size: images per step (array data).
    seed: the shuffling and augmentation seed.
    augment: e.g. :func:`flip_crop`; the key of step s of epoch e is ``fold_in(fold_in(key(seed), e), s)``.
    data_axis: the mesh axis the batch is split over.
    desc: the progress bar's label.
    checkpoint_every: epochs between checkpoints.

  Returns:
    The trained variables and one dict per epoch: ``epoch``, ``loss``, ``accuracy`` (train, running
    mean over the epoch), ``eval_accuracy`` (if ``eval_data``), ``seconds``.

  Images holding NaN or inf and labels outside ``[0, number of outputs)`` are refused before training
  (``TrainingError``; batch callables: labels when their batch comes); a loss that becomes NaN or inf stops
  the run with ``FloatingPointError`` naming the epoch and step, before that epoch is checkpointed.
  """
  data = _Data(train_data, batch_size, seed)
  classes = _num_classes(module, variables, data.images) if data.fn is None else None
  data.check_labels(classes)
  optimizer = _optimizer(optimizer, data.steps)
  state = init_state(module, variables, optimizer)
  step = make_step(module, optimizer, mesh, data_axis, augment=augment, donate=True)
  sh = None if mesh is None else shardings(mesh, data_axis)
  evaluate_fn = None if eval_data is None else (
      lambda st: evaluate(module, state_variables(st), eval_data, mesh, data_axis=data_axis))
  state, history = _loop(step, state, [data], epochs, sh, seed, checkpoint_dir, progress, desc, evaluate_fn, False,
                         checkpoint_every, time_limit, _probe(optimizer) if checkpoint_dir is not None else None,
                         allow_optimizer_change,
                         _classes_fn(module, variables, classes))
  return state_variables(jax.device_get(state)), history


def fit_many(module, variables: Sequence[Mapping[str, Any]], train_data: Sequence[TrainData], *, epochs: int,
             optimizer, mesh: Mesh | None = None, eval_data=None, checkpoint_dir=None, progress: bool = True,
             batch_size: int = 128, seed: int = 0, augment: Augment | None = None, data_axis: str = "data",
             model_axis: str = "models", desc: str = "train", checkpoint_every: int = 1,
             time_limit: float | None = None, allow_optimizer_change: bool = False) -> tuple[list[dict], list[dict]]:
  """k models trained side by side, model i on ``train_data[i]``, as one program with a model axis
  (see :func:`make_step`); the arguments are those of :func:`fit`. Returns ``([variables_i], history)``;
  history entries hold per-model lists. Every model takes the same number of steps per epoch (the
  smallest data set's)."""
  if len(variables) != len(train_data) or not variables:
    raise TrainingError(f"fit_many needs one training set per model, got {len(variables)} models and "
                        f"{len(train_data)} training sets")
  datas = [_Data(d, batch_size, seed + i, f"train_data[{i}]") for i, d in enumerate(train_data)]
  arrays = [d for d in datas if d.fn is None]
  classes = _num_classes(module, variables[0], arrays[0].images) if arrays else None
  for d in datas:
    d.check_labels(classes)
  steps = [d.steps for d in datas if d.steps is not None]
  optimizer = _optimizer(optimizer, min(steps) if steps else None)
  state = stack([init_state(module, v, optimizer) for v in variables])
  step = make_step(module, optimizer, mesh, data_axis, model_axis=model_axis, augment=augment, donate=True)
  sh = None if mesh is None else shardings(mesh, data_axis, model_axis)

  def evaluate_all(st):
    return [evaluate(module, state_variables(s), eval_data) for s in unstack(jax.device_get(st))]

  state, history = _loop(step, state, datas, epochs, sh, seed, checkpoint_dir, progress, desc,
                         None if eval_data is None else evaluate_all, True, checkpoint_every, time_limit,
                         _probe(optimizer) if checkpoint_dir is not None else None,
                         allow_optimizer_change, _classes_fn(module, variables[0], classes))
  return [state_variables(s) for s in unstack(jax.device_get(state))], history


def _optimizer(optimizer, steps_per_epoch: int | None) -> optax.GradientTransformation:
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer
  if callable(optimizer):
    if steps_per_epoch is None:
      raise TrainingError("an optimizer factory needs the steps per epoch; with batch callables pass an optax "
                          "transformation")
    return cast(optax.GradientTransformation, optimizer(steps_per_epoch))
  raise TrainingError(f"optimizer must be an optax transformation or a callable steps_per_epoch -> one, "
                      f"got {type(optimizer).__name__}")


_PROBE_STEPS = (0, 1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000, 1_000_000)


def _probe(optimizer: optax.GradientTransformation) -> list[float] | None:
  """What ``optimizer`` does, as numbers a checkpoint can keep: its updates of a small fixed parameter vector
  for a fixed gradient, from its fresh state with every integer state leaf (step counts of schedules) set to
  each of ``_PROBE_STEPS``, and two successive updates from the fresh state (momentum, moments). None if the
  optimizer cannot be probed this way (it then goes unchecked)."""
  params = {"w": jnp.asarray([1.0, -2.0, 0.5, 0.0], jnp.float32)}
  grads = {"w": jnp.asarray([0.3, -0.1, 0.7, 0.0], jnp.float32)}

  def at(state, n):
    return jax.tree_util.tree_map(
        lambda x: jnp.full_like(x, n) if jnp.issubdtype(jnp.result_type(x), jnp.integer) else x, state)

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      fresh, out = optimizer.init(params), []
      # (optax types updates as any array tree; they mirror params, a dict)
      for n in _PROBE_STEPS:
        out.append(optimizer.update(grads, at(fresh, n), params)[0]["w"])  # pyright: ignore[reportIndexIssue]
      first, state = optimizer.update(grads, fresh, params)
      out.append(optimizer.update(grads, state, optax.apply_updates(params, first))[0]["w"])  # pyright: ignore[reportIndexIssue]
      return [float(v) for v in np.concatenate([np.asarray(u, np.float64).reshape(-1) for u in out])]
  except Exception:  # noqa: BLE001 (an optimizer whose update needs more than (grads, state, params))
    return None


def _classes_fn(module, variables, known: int | None) -> Callable[[np.ndarray], int | None]:
  """``images -> number of outputs``, computed once (``known`` if already known from array data)."""
  memo: list[int | None] = [] if known is None else [known]

  def classes(images):
    if not memo:
      memo.append(_num_classes(module, variables, images))
    return memo[0]

  return classes


def _loop(step, state: TrainState, datas: list[_Data], epochs: int, sh, seed: int, checkpoint_dir, progress: bool,
          desc: str, evaluate_fn, many: bool, checkpoint_every: int = 1, time_limit: float | None = None,
          probe: list[float] | None = None, allow_optimizer_change: bool = False,
          classes: Callable[[np.ndarray], int | None] | None = None) -> tuple[TrainState, list[dict]]:
  """The epoch loop shared by :func:`fit` and :func:`fit_many` (``many``: one data set per model, batches
  stacked on a leading model axis)."""
  started = time.perf_counter()
  if not isinstance(epochs, int) or epochs < 0:
    raise TrainingError(f"epochs must be a non-negative int, got {epochs!r}")
  if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
    raise TrainingError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
  if time_limit is not None and not time_limit > 0:
    raise TrainingError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
  fingerprint = {"batch_size": datas[0].batch_size, "seed": seed, "models": len(datas)}
  history, start = [], 0
  if checkpoint_dir is not None:
    from ifjax import _save
    _save.check_path(checkpoint_dir, "checkpoint_dir")  # before any training: a bad path would lose every epoch
    state, history, start = _resume(checkpoint_dir, state, fingerprint, probe, allow_optimizer_change, epochs)
  state = shard(jax.tree_util.tree_map(jnp.array, state), None if sh is None else sh[0])  # a copy: steps donate it
  show = progress and jax.process_index() == 0
  for epoch in range(start, epochs):
    t0 = time.perf_counter()
    bar = _bar(show, datas[0].steps, f"{desc} epoch {epoch + 1}/{epochs}")
    sums, count, losses = None, 0, []
    epoch_key = jax.random.fold_in(jax.random.key(seed), epoch)
    for i, batches in enumerate(zip(*[d.epoch(epoch) for d in datas])):
      images, labels = (np.stack(xs) for xs in zip(*batches)) if many else batches[0]
      if datas[0].fn is not None:  # batch callables: labels checked as they come (arrays were checked up front)
        first = np.asarray(images)[0] if many else np.asarray(images)
        _check_labels(labels, classes(first) if classes is not None else None,
                      f"epoch {epoch + 1}, step {i + 1}: the batch's labels")
      images, labels = shard((np.asarray(images), np.asarray(labels, np.int32)), None if sh is None else sh[1])
      state, metrics = step(state, images, labels, jax.random.fold_in(epoch_key, i))
      losses.append(metrics["loss"])
      sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
      count += 1
      if bar is not None and (i % 10 == 0):
        bar.set_postfix({k: _fmt(v / count) for k, v in jax.device_get(sums).items()})
      if bar is not None:
        bar.update(1)
    if count == 0:
      raise TrainingError(f"epoch {epoch}: the training data yielded no batch")
    means = {k: np.asarray(v) / count for k, v in jax.device_get(sums).items()}
    if bar is not None:
      bar.set_postfix({k: _fmt(v) for k, v in means.items()})
      bar.close()
    if not np.all(np.isfinite(means["loss"])):
      _non_finite_loss(losses, epoch, desc)
    entry = {"epoch": epoch + 1, **{k: v.tolist() for k, v in means.items()}}
    if evaluate_fn is not None:
      entry["eval_accuracy"] = evaluate_fn(state)
    entry["seconds"] = time.perf_counter() - t0
    history.append(entry)
    out_of_time = time_limit is not None and time.perf_counter() - started > time_limit
    if checkpoint_dir is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs or out_of_time):
      _checkpoint(checkpoint_dir, state, history, epoch + 1, fingerprint, probe)
    if out_of_time and epoch + 1 < epochs:
      warnings.warn(f"{desc}: time_limit of {time_limit:.0f} s reached after epoch {epoch + 1} of {epochs}; stopping",
                    stacklevel=3)
      break
  return state, history


def _non_finite_loss(losses: list, epoch: int, desc: str):
  """Raises FloatingPointError naming the first step of ``epoch`` whose loss was NaN or inf."""
  values = np.asarray(jax.device_get(losses), np.float64).reshape(len(losses), -1)
  bad = ~np.isfinite(values)
  i = int(np.argmax(bad.any(axis=1)))
  which = "" if values.shape[1] == 1 else f" (model {int(np.argmax(bad[i]))})"
  raise FloatingPointError(
      f"{desc}: the training loss became {values[i][bad[i]][0]} at epoch {epoch + 1}, step {i + 1}{which}; "
      "stopping (this epoch is not checkpointed). Likely causes: NaN or inf in the inputs, labels outside the "
      "model's classes, or a learning rate that diverges")


def _fmt(v) -> str:
  v = np.asarray(v)
  return f"{float(v):.4f}" if v.ndim == 0 else "/".join(f"{float(x):.3f}" for x in v)


def _bar(show: bool, total: int | None, desc: str):
  if not show:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _checkpoint(directory, state: TrainState, history: list[dict], epoch: int, fingerprint: dict,
                probe: list[float] | None = None, unit: str = "epoch"):
  """Saves ``<directory>/<unit>_<epoch>`` (``unit``: ``"epoch"`` for fit, ``"step"`` for distill)."""
  from ifjax import _save
  _save.write_tree(Path(directory) / f"{unit}_{epoch}", jax.device_get(state),
                   {"epoch": epoch, "history": history, "fingerprint": fingerprint, "optimizer": probe})


def _resume(directory, state: TrainState, fingerprint: dict, probe: list[float] | None = None,
            allow_optimizer_change: bool = False, epochs: int | None = None,
            unit: str = "epoch") -> tuple[TrainState, list[dict], int]:
  from ifjax import _save
  path = _save.latest(directory, unit)
  if path is None:
    return state, [], 0
  meta = _save._read_manifest(path)["meta"]  # checked before the arrays are read
  if meta.get("fingerprint") != fingerprint:
    raise TrainingError(f"{path}: this checkpoint was written with {meta.get('fingerprint')}, but the run asks for "
                        f"{fingerprint}; use another checkpoint_dir or the same settings")
  saved = meta.get("optimizer")  # absent in checkpoints of older versions, None if not probeable
  if (not allow_optimizer_change and saved is not None and probe is not None
      and (len(saved) != len(probe) or not np.allclose(saved, probe, rtol=1e-4, atol=1e-12, equal_nan=True))):
    raise TrainingError(
        f"checkpoint_dir: {path} was written with another optimizer, learning rate or schedule than this run's "
        f"(their first update of a probe gradient: {saved[:4]} saved, {probe[:4]} now; they differ at "
        f"{int(np.sum(~np.isclose(saved, probe, rtol=1e-4, atol=1e-12)))} of {len(probe)} probes); resume with the "
        "same optimizer, use another checkpoint_dir, or pass allow_optimizer_change=True to continue from the "
        "saved state with the new optimizer")
  saved_epoch = int(meta["epoch"])
  if epochs is not None and epochs < saved_epoch:
    raise TrainingError(f"{unit}s={epochs}, but checkpoint_dir already holds {unit} {saved_epoch} ({path}): a run of "
                        f"{epochs} {unit}s cannot be resumed from there; pass {unit}s >= {saved_epoch} ({unit}s="
                        f"{saved_epoch} returns the saved model) or use another checkpoint_dir")
  try:
    restored, meta = _save.read_tree(path, state)  # rebuilt into the TrainState structure
  except _save.SaveFormatError as e:
    if not allow_optimizer_change:
      raise
    raise TrainingError(f"allow_optimizer_change=True, but the optimizer state saved in {path} does not fit the "
                        f"new optimizer's: {e}") from e
  return restored, list(meta["history"]), saved_epoch
