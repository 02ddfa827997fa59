"""NumPy and JAX scalars where ifjax takes a Python number.

A ratio of ``jnp.float32(0.5)`` or a fold count of ``np.int64(4)`` is the same number as its Python twin;
:func:`python_scalar` turns such 0-d values (NumPy scalars, 0-d NumPy arrays, concrete 0-d JAX arrays) of the
wanted kind into Python numbers and leaves everything else alone, so the caller's own checks still refuse
bools, strings, lists and arrays of other shapes by name.

>>> import numpy as np, jax.numpy as jnp
>>> python_scalar(jnp.float32(0.5)), python_scalar(np.int64(4), "iu"), python_scalar(np.float64(2.0), "iu")
(0.5, 4, np.float64(2.0))
>>> python_scalar(True), python_scalar(np.bool_(True)), python_scalar([0.5])
(True, np.True_, [0.5])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.core
import numpy as np

from ifjax._errors import ArgumentTypeError

__all__ = ["ScalarTypeError", "python_scalar"]


class ScalarTypeError(ArgumentTypeError):
  """A number was expected and something else came (a bool, a str, a list): a ``TypeError``, and also the
  ``ValueError`` these checks raised before, so callers catching ``ValueError`` keep working."""


def python_scalar(x: Any, kinds: str = "iuf", what: str = "the value") -> Any:
  """``x`` as a Python int or float if it is a 0-d NumPy / JAX number whose dtype kind is in ``kinds``
  (``"i"``, ``"u"``: integers, ``"f"``: floats; never bools); anything else unchanged.

  A traced JAX value (under ``jit`` / ``grad``) has no concrete value to check: ``TypeError`` naming ``what``.
  """
  if isinstance(x, jax.core.Tracer):
    if np.ndim(x) == 0 and np.dtype(x.dtype).kind in kinds:
      raise TypeError(f"{what} must be a concrete number, got a traced value {x!r:.80} (under jax.jit / grad); "
                      "pass it as a Python number (a static argument)")
    return x
  if isinstance(x, (np.generic, np.ndarray, jax.Array)) and np.ndim(x) == 0:
    # (jax.dtypes re-exports issubdtype without marking it public)
    if (not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # pyright: ignore[reportPrivateImportUsage]
        and np.dtype(x.dtype).kind in kinds):
      return np.asarray(x).item()
  return x
