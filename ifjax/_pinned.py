"""One process per model, pinned to its own CPU cores: Split-Data training with a measured (not simulated) speed-up.

:func:`run_pinned` runs a top-level function once per job, each in a fresh ``spawn`` process whose CPU affinity
(``os.sched_setaffinity``) is that job's core set, with XLA's CPU backend made single-threaded per device
(``--xla_cpu_multi_thread_eigen=false``) and one simulated XLA:CPU device per core
(``--xla_force_host_platform_device_count``). A job on several cores can build a data-parallel mesh over
``jax.devices()`` (one device per core). :func:`train_pinned` is the Split-Data use: model i trains on
``datasets[i]`` with :func:`ifjax.train.fit` on its cores, all models at once.

Re-exported by :mod:`ifjax.split_data`.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from ifjax._errors import IfjaxError

THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"


class PinnedError(IfjaxError, RuntimeError):
  """A pinned job failed in its process (the child's traceback is in the message) or could not be placed."""


class PinnedResult(NamedTuple):
  """Attributes: ``outputs`` (one per job, what the function returned), ``seconds`` (wall time of each job,
  measured in its process around the call: imports and start-up excluded), ``wall`` (from the first start to the
  last result, start-up included), ``cores`` (each job's core set), ``loadavg`` (``os.getloadavg()`` before and
  after)."""

  outputs: list[Any]
  seconds: list[float]
  wall: float
  cores: list[tuple[int, ...]]
  loadavg: tuple[tuple[float, float, float], tuple[float, float, float]]


def available_cores() -> list[int]:
  """The cores this process may run on (its affinity), sorted."""
  return sorted(os.sched_getaffinity(0))


def core_sets(jobs: int, cores: Sequence[int] | Sequence[Sequence[int]] | None = None,
              per_job: int = 1) -> list[tuple[int, ...]]:
  """Disjoint core sets, one per job: ``cores`` a list of core ids (``per_job`` each, in order) or a list of
  sets; default this process's affinity. ``SplitDataError`` when the jobs outnumber the sets.

  >>> core_sets(2, [0, 1])
  [(0,), (1,)]
  """
  from ifjax.split_data import SplitDataError

  given: list[Any] = available_cores() if cores is None else list(cores)
  if given and all(isinstance(c, int) for c in given):
    flat = [int(c) for c in given]
    sets = [tuple(flat[i:i + per_job]) for i in range(0, len(flat) - per_job + 1, per_job)]
  else:
    sets = [tuple(int(c) for c in s) for s in given]
  if jobs > len(sets):
    raise SplitDataError(f"{jobs} models need {jobs} disjoint core sets of {per_job} core(s), but only {len(sets)} "
                         f"are available ({given}): give fewer models, fewer cores per model, or train them in one "
                         f"process (split_data.train_models)")
  sets = sets[:jobs]
  used = [c for s in sets for c in s]
  if len(set(used)) != len(used) or any(not s for s in sets):
    raise SplitDataError(f"the core sets must be non-empty and disjoint, got {sets}")
  allowed = set(available_cores())
  if not set(used) <= allowed:
    raise SplitDataError(f"cores {sorted(set(used) - allowed)} are outside this process's affinity {sorted(allowed)}")
  return sets


def _child(conn, cores: tuple[int, ...], fn: Callable, args: tuple, kwargs: dict):
  try:
    os.sched_setaffinity(0, set(cores))
    conn.send(("ready", None))
    conn.recv()  # the parent starts every job's clock together
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    import jax

    conn.send(("ok", (jax.device_get(out), time.perf_counter() - t0)))
  except BaseException as e:  # noqa: BLE001 (sent to the parent, which raises it)
    conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
  finally:
    conn.close()


def run_pinned(fn: Callable, jobs: Sequence[tuple[tuple, Mapping[str, Any]]], *,
               cores: Sequence[int] | Sequence[Sequence[int]] | None = None, per_job: int = 1,
               extra_flags: str = "", timeout: float | None = None, device_per_core: bool = True) -> PinnedResult:
  """Runs ``fn(*args, **kwargs)`` for every ``(args, kwargs)`` in ``jobs``, each in its own process pinned to its
  own cores (see :func:`core_sets`), all at once; returns their outputs and times (:class:`PinnedResult`).

  ``fn`` and its arguments must pickle (a top-level function; a zoo model name or a module class instance, not a
  lambda). Each process first imports and pins, then all start ``fn`` together, so ``seconds`` time the work
  alone. ``PinnedError`` carries a failed job's traceback.

  ``device_per_core=False``: a job on several cores gets one XLA:CPU device that uses them all (XLA's
  multi-threaded intra-op parallelism) instead of one single-threaded device per core. Under heavy load the
  device-per-core mesh's all-reduce rendezvous has been seen to time out (XLA aborts the process after 40 s).
  """
  sets = core_sets(len(jobs), cores, per_job)
  ctx = multiprocessing.get_context("spawn")
  load0 = os.getloadavg()
  procs, conns = [], []
  saved = os.environ.get("XLA_FLAGS")
  try:
    for (args, kwargs), s in zip(jobs, sets):
      per_core = device_per_core or len(s) == 1
      count = f"--xla_force_host_platform_device_count={len(s) if per_core else 1}"
      os.environ["XLA_FLAGS"] = " ".join(f for f in (saved or "", THREAD_FLAGS if per_core else "", extra_flags, count)
                                         if f)
      parent, child = ctx.Pipe()
      p = ctx.Process(target=_child, args=(child, s, fn, tuple(args), dict(kwargs)), daemon=True)
      p.start()
      child.close()
      procs.append(p)
      conns.append(parent)
  finally:
    if saved is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = saved
  try:
    for i, c in enumerate(conns):
      tag, msg = _receive(c, timeout, i)
      if tag == "error":
        raise PinnedError(f"pinned job {i} (cores {sets[i]}) failed before starting: {msg}")
    t0 = time.perf_counter()
    for c in conns:
      c.send("go")
    outputs, seconds = [], []
    for i, c in enumerate(conns):
      tag, msg = _receive(c, timeout, i)
      if tag == "error":
        raise PinnedError(f"pinned job {i} (cores {sets[i]}) failed: {msg}")
      outputs.append(msg[0])
      seconds.append(msg[1])
    wall = time.perf_counter() - t0
  finally:
    for p in procs:
      p.join(timeout=5)
      if p.is_alive():
        p.terminate()
  return PinnedResult(outputs, seconds, wall, sets, (load0, os.getloadavg()))


def _receive(conn, timeout: float | None, i: int):
  if timeout is not None and not conn.poll(timeout):
    raise PinnedError(f"pinned job {i} sent nothing within {timeout} s")
  try:
    return conn.recv()
  except EOFError as e:
    raise PinnedError(f"pinned job {i}'s process ended without a result (killed, or out of memory?)") from e


def fit_job(model, variables, train_data, *, epochs: int, optimizer, data_parallel: bool = True,
            **fit_options) -> tuple[dict, list[dict]]:
  """:func:`ifjax.train.fit` inside a pinned process: ``model`` a zoo name or a flax module, data-parallel over
  the process's devices (one per core) when there are several."""
  import jax

  from ifjax import models, train

  module = models.get(model)[0] if isinstance(model, str) else model
  mesh = train.make_mesh({"data": jax.device_count()}) if data_parallel and jax.device_count() > 1 else None
  return train.fit(module, variables, train_data, epochs=epochs, optimizer=optimizer, mesh=mesh, **fit_options)


def train_pinned(model, variables: Sequence[Mapping[str, Any]], datasets: Sequence, *, epochs: int, optimizer,
                 cores: Sequence[int] | Sequence[Sequence[int]] | None = None, per_job: int = 1,
                 timeout: float | None = None, **fit_options) -> tuple[list[dict], list[list[dict]], PinnedResult]:
  """Model i trains from ``variables[i]`` on ``datasets[i]`` in its own process on its own ``per_job`` cores
  (:func:`run_pinned`), all at once; ``fit_options`` as for :func:`ifjax.train.fit` (picklable: e.g.
  ``functools.partial(train.paper_sgd, "train")`` as the optimizer). The training sets may differ in size.
  Returns ``(variables, histories, PinnedResult)``; with the same seed and data each model equals the one
  :func:`ifjax.train.fit` gives in-process (to float tolerance: thread counts change summation order)."""
  from ifjax.split_data import SplitDataError

  if len(variables) != len(datasets):
    raise SplitDataError(f"train_pinned: {len(variables)} models but {len(datasets)} training sets")
  fit_options.setdefault("progress", False)
  jobs = [((model, v, d), dict(epochs=epochs, optimizer=optimizer, **fit_options))
          for v, d in zip(variables, datasets)]
  res = run_pinned(fit_job, jobs, cores=cores, per_job=per_job, timeout=timeout)
  return [o[0] for o in res.outputs], [o[1] for o in res.outputs], res
