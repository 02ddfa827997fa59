"""ifjax: Intra-Fusion (Theus et al., ICLR 2024) structured pruning as pure functions on Flax pytrees.

>>> import ifjax
>>> ifjax.kept_count(512, 0.3)  # neurons kept of a 512-wide group at 30% sparsity, as the authors' code
358
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the names below are, for type checkers and IDEs; at run time they load lazily
  from ifjax import analysis, calibration, finetune, importance, models, split_data, train
  from ifjax._batchnorm import fold_batchnorm
  from ifjax._budget import Allocation, allocate, bn_sensitivity, flops, param_count
  from ifjax._cache import enable_compilation_cache
  from ifjax._checkpoint import CheckpointError, CheckpointMismatchError, load_into, read_torch, state_dict
  from ifjax._compress import CompressResult, compress
  from ifjax._errors import ArgumentTypeError, IfjaxError
  from ifjax._fuse import (
    ConvergenceError,
    ConvergenceWarning,
    GroupPlan,
    Plan,
    apply_plan,
    intra_fuse,
    iterative_fuse,
    kept_count,
    plan,
    prune,
    transport_maps,
  )
  from ifjax._modelfusion import Alignment, GroupAlignment, align_models, fuse_models
  from ifjax._repair import recalibrate_batchnorm, unfold_batchnorm
  from ifjax._save import SaveFormatError, restore, save
  from ifjax._sensitivity import SensitivityCurves, measure_sensitivity
  from ifjax._spec import BatchNormPair, FlatMember, Group, Member, Spec, match_groups, widths
  from ifjax._synthetic import SyntheticInputs, bn_statistics_gap, synthesize_inputs
  from ifjax._trace import (
    PaddedChannelsWarning,
    SpecCheckError,
    UnsupportedPrimitiveError,
    check_spec,
    nnx_apply,
    trace_spec,
  )
  from ifjax._trace.resize import ResizeError, resize, resize_nnx
  from ifjax._transport import Transport, kmeans, pairwise_distance, solve_exact, solve_sinkhorn

# name -> the module that defines it: imported on first use, so ``import ifjax`` (and ``ifjax --help``) does
# not load jax, flax or optax until something needs them
_SUBMODULES = frozenset({"analysis", "calibration", "finetune", "importance", "models", "split_data", "train", "data"})
_EXPORTS = {
    "fold_batchnorm": "ifjax._batchnorm",
    "Allocation": "ifjax._budget",
    "allocate": "ifjax._budget",
    "bn_sensitivity": "ifjax._budget",
    "flops": "ifjax._budget",
    "param_count": "ifjax._budget",
    "enable_compilation_cache": "ifjax._cache",
    "CheckpointError": "ifjax._checkpoint",
    "CheckpointMismatchError": "ifjax._checkpoint",
    "load_into": "ifjax._checkpoint",
    "read_torch": "ifjax._checkpoint",
    "state_dict": "ifjax._checkpoint",
    "CompressResult": "ifjax._compress",
    "compress": "ifjax._compress",
    "ArgumentTypeError": "ifjax._errors",
    "IfjaxError": "ifjax._errors",
    "ConvergenceError": "ifjax._fuse",
    "ConvergenceWarning": "ifjax._fuse",
    "GroupPlan": "ifjax._fuse",
    "Plan": "ifjax._fuse",
    "apply_plan": "ifjax._fuse",
    "intra_fuse": "ifjax._fuse",
    "iterative_fuse": "ifjax._fuse",
    "kept_count": "ifjax._fuse",
    "plan": "ifjax._fuse",
    "prune": "ifjax._fuse",
    "transport_maps": "ifjax._fuse",
    "Alignment": "ifjax._modelfusion",
    "GroupAlignment": "ifjax._modelfusion",
    "align_models": "ifjax._modelfusion",
    "fuse_models": "ifjax._modelfusion",
    "recalibrate_batchnorm": "ifjax._repair",
    "unfold_batchnorm": "ifjax._repair",
    "SaveFormatError": "ifjax._save",
    "restore": "ifjax._save",
    "save": "ifjax._save",
    "SensitivityCurves": "ifjax._sensitivity",
    "measure_sensitivity": "ifjax._sensitivity",
    "BatchNormPair": "ifjax._spec",
    "FlatMember": "ifjax._spec",
    "Group": "ifjax._spec",
    "Member": "ifjax._spec",
    "Spec": "ifjax._spec",
    "match_groups": "ifjax._spec",
    "widths": "ifjax._spec",
    "SyntheticInputs": "ifjax._synthetic",
    "bn_statistics_gap": "ifjax._synthetic",
    "synthesize_inputs": "ifjax._synthetic",
    "SpecCheckError": "ifjax._trace",
    "UnsupportedPrimitiveError": "ifjax._trace",
    "PaddedChannelsWarning": "ifjax._trace",
    "check_spec": "ifjax._trace",
    "nnx_apply": "ifjax._trace",
    "trace_spec": "ifjax._trace",
    "ResizeError": "ifjax._trace.resize",
    "resize": "ifjax._trace.resize",
    "resize_nnx": "ifjax._trace.resize",
    "Transport": "ifjax._transport",
    "kmeans": "ifjax._transport",
    "pairwise_distance": "ifjax._transport",
    "solve_exact": "ifjax._transport",
    "solve_sinkhorn": "ifjax._transport",
}


def __getattr__(name: str):
  if name in _SUBMODULES:
    value = importlib.import_module(f"ifjax.{name}")
  elif name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  else:
    raise AttributeError(f"module 'ifjax' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "Alignment",
    "Allocation",
    "ArgumentTypeError",
    "BatchNormPair",
    "CheckpointError",
    "CheckpointMismatchError",
    "CompressResult",
    "ConvergenceError",
    "ConvergenceWarning",
    "FlatMember",
    "Group",
    "GroupAlignment",
    "GroupPlan",
    "IfjaxError",
    "Member",
    "PaddedChannelsWarning",
    "Plan",
    "ResizeError",
    "SaveFormatError",
    "SensitivityCurves",
    "Spec",
    "SpecCheckError",
    "SyntheticInputs",
    "Transport",
    "UnsupportedPrimitiveError",
    "align_models",
    "allocate",
    "analysis",
    "apply_plan",
    "bn_sensitivity",
    "bn_statistics_gap",
    "calibration",
    "check_spec",
    "compress",
    "enable_compilation_cache",
    "finetune",
    "flops",
    "fold_batchnorm",
    "fuse_models",
    "importance",
    "intra_fuse",
    "iterative_fuse",
    "kept_count",
    "kmeans",
    "load_into",
    "match_groups",
    "measure_sensitivity",
    "models",
    "nnx_apply",
    "pairwise_distance",
    "param_count",
    "plan",
    "prune",
    "read_torch",
    "recalibrate_batchnorm",
    "resize",
    "resize_nnx",
    "restore",
    "save",
    "solve_exact",
    "solve_sinkhorn",
    "split_data",
    "state_dict",
    "synthesize_inputs",
    "trace_spec",
    "train",
    "transport_maps",
    "unfold_batchnorm",
    "widths",
]
