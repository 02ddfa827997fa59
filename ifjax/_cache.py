"""Opt-in persistent XLA compilation cache, so that a second process starts warm."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path:
  """Stores every compiled XLA program of this process under ``directory`` and reuses them in later ones.

  Default: ``$IFJAX_CACHE/xla`` or ``~/.cache/ifjax/xla``. Every program is cached, however fast its
  compilation (JAX's default keeps only those over 1 s). Call it once, before the first ``jit`` call;
  returns the directory. The cache is JAX's own (``jax_compilation_cache_dir``); delete the folder to clear it.
  """
  if directory is None:
    env = os.environ.get("IFJAX_CACHE")
    directory = (Path(env) if env else Path.home() / ".cache" / "ifjax") / "xla"
  path = Path(directory).expanduser().resolve()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
