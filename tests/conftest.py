"""Shared pytest fixtures for the ifjax test-suite (tiny, deterministic, CPU-friendly)."""

import jax
import numpy as np
import pytest

# Every test runs with JAX's default 32-bit types; ifjax computes in float32.
jax.config.update("jax_enable_x64", False)


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
