"""Shared pytest fixtures for the ifjax test-suite (tiny, deterministic, CPU-friendly)."""

import jax
import numpy as np
import pytest

from ifjax import data, models

# Every test runs with JAX's default 32-bit types; ifjax computes in float32.
jax.config.update("jax_enable_x64", False)


def pytest_runtest_setup(item):
  """Skip a test marked ``requires_data(*paths, models=(...))`` when a file it names is missing.

  ``paths`` are relative to :func:`ifjax.data.data_dir`; ``models`` are names for :func:`ifjax.models.pretrained`.
  """
  for mark in item.iter_markers("requires_data"):
    root = data.data_dir()
    wanted = [root / rel for rel in mark.args] + [models.checkpoint_path(m) for m in mark.kwargs.get("models", ())]
    missing = [str(p) for p in wanted or [root] if not p.exists()]
    if missing:
      pytest.skip(f"{', '.join(missing)} not found: put the shared data in {root} or set IFJAX_DATA to the folder "
                  "holding it (see ../shared/data/README.md)")


@pytest.fixture
def rng():
  """A fresh, fixed-seed NumPy generator per test."""
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def rel_err():
  """``max|a - b| / max|b|`` as a float (the relative error used for function-preservation checks)."""

  def fn(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

  return fn


@pytest.fixture(scope="session")
def coverage_models():
  """``tests/coverage_models.py`` (the models of the README coverage table) as a module: ``build(name)``, ``CASES``."""
  import coverage_models  # tests/ is on pytest's pythonpath (pyproject.toml)

  return coverage_models
