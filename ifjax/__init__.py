"""ifjax: Intra-Fusion (Theus et al., ICLR 2024) structured pruning as pure functions on Flax pytrees.

>>> import ifjax
>>> ifjax.kept_count(512, 0.3)  # neurons kept of a 512-wide group at 30% sparsity, as the authors' code
358
"""

from ifjax import analysis, finetune, importance, models, split_data, train
from ifjax._batchnorm import fold_batchnorm
from ifjax._budget import Allocation, allocate, bn_sensitivity, flops, param_count
from ifjax._cache import enable_compilation_cache
from ifjax._checkpoint import CheckpointError, CheckpointMismatchError, load_into, read_torch, state_dict
from ifjax._compress import CompressResult, compress
from ifjax._errors import ArgumentTypeError, IfjaxError
from ifjax._fuse import (ConvergenceError, ConvergenceWarning, GroupPlan, Plan, apply_plan, intra_fuse, iterative_fuse,
                         kept_count, plan, prune, transport_maps)
from ifjax._modelfusion import Alignment, GroupAlignment, align_models, fuse_models
from ifjax._repair import recalibrate_batchnorm, unfold_batchnorm
from ifjax._save import SaveFormatError, restore, save
from ifjax._sensitivity import SensitivityCurves, measure_sensitivity
from ifjax._spec import BatchNormPair, FlatMember, Group, Member, Spec, match_groups, widths
from ifjax._synthetic import SyntheticInputs, bn_statistics_gap, synthesize_inputs
from ifjax._trace import SpecCheckError, UnsupportedPrimitiveError, check_spec, nnx_apply, trace_spec
from ifjax._trace.resize import ResizeError, resize, resize_nnx
from ifjax._transport import Transport, kmeans, pairwise_distance, solve_exact, solve_sinkhorn

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
