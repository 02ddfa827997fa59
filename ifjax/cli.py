"""The ``ifjax`` command: prune a zoo model to a ratio or a budget, evaluate it, trace a spec, run an experiment.

    ifjax prune --model resnet20 --ratio 0.5 --method if --out r20_if50
    ifjax eval r20_if50 --data cifar10-test --limit 1000
    ifjax trace mypackage.nets:make --input-shape 1,32,32,3
    ifjax experiment budget --model resnet56 --flops 0.52 --out results/budget

``python -m ifjax`` is the same command; :func:`main` runs it in-process and returns the exit code
(:class:`ExitCode`). Expected user errors print one line, ``ifjax <command>: error: ...``, and no traceback.
orbax, tqdm and the user's module are imported only when a command needs them.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast, overload

from ifjax._errors import IfjaxError

__all__ = ["ExitCode", "main"]


class ExitCode(enum.IntEnum):
  """Exit status of the ``ifjax`` command (an experiment script's own status is passed through)."""

  OK = 0
  USAGE = 2  # bad arguments (argparse's own code), an output that exists already, a factory that cannot be loaded
  MISSING_DATA = 3  # a data set or pretrained weights file is not under IFJAX_DATA
  BAD_CHECKPOINT = 4  # a checkpoint that is missing, unreadable, corrupt, or not of the model
  BAD_RATIO = 5  # a ratio outside [0, 1), or a budget that cannot be met
  UNKNOWN_MODEL = 6  # a model name that is not in the zoo
  SPEC_FAILED = 7  # trace: the tracer cannot follow the function, or check_spec rejects the traced spec
  NO_EXPERIMENTS = 8  # experiment: the script is in neither $IFJAX_EXPERIMENTS nor the source tree's experiments/


class CliError(IfjaxError):
  """An expected failure: ``main`` prints the message on one line and exits with ``code``."""

  def __init__(self, code: ExitCode, message: str):
    super().__init__(message)
    self.code = code


EXPERIMENTS = {"data-free": "data_free.py", "fine-tune": "fine_tune.py", "split-data": "split_data.py",
               "budget": "budget.py", "train-cifar": "train_cifar.py", "digits": "digits.py"}
# the zoo's models and the built-in importances, here so that building the parser imports nothing heavy
# (``ifjax --help`` stays instant); tests/test_cli.py checks them against ifjax.models.names() and
# ifjax.importance.BUILTIN
ZOO = ("digits_cnn", "efficientnet_lite0", "lenet5", "mlp", "resnet110", "resnet18", "resnet20", "resnet32", "resnet44",
       "resnet50", "resnet56", "vgg11_bn")
IMPORTANCES = ("l1", "l2", "lamp", "linf", "random")
DATASETS = ("cifar10-test", "cifar10-train", "cifar10-lossless", "mnist-test", "imagenet-sample", "digits-test")

_EXIT_CODES = """exit codes:
  0 success, 2 usage, 3 missing data (looked under $IFJAX_DATA), 4 bad checkpoint, 5 bad ratio or budget,
  6 unknown model, 7 spec trace or check failed, 8 experiment scripts not found"""

_MAIN_EPILOG = f"""examples:
  ifjax prune --model resnet20 --ratio 0.5 --method if --out r20_if50     # Intra-Fusion, every group at 50%
  ifjax prune --model resnet56 --target-flops 0.5 --method default --out r56_half
  ifjax eval r20_if50 --data cifar10-test --limit 1000
  ifjax eval resnet20                                                     # the dense pretrained model
  ifjax trace mypackage.nets:make_net --input-shape 1,32,32,3 --kwarg train=False
  ifjax experiment data-free --model resnet20 --out results/resnet20_l1

Data and weights are read from $IFJAX_DATA (default: a source checkout's ../shared/data, else
~/.local/share/ifjax); the digits_cnn weights ship with ifjax.
Run 'ifjax COMMAND --help' for a command's options.

{_EXIT_CODES}"""

_PRUNE_EPILOG = f"""examples:
  ifjax prune --model resnet20 --ratio 0.5 --out r20_if50
  ifjax prune --model resnet20 --ratio 0.3 --groups 0 1 layer3_2/conv1 --method default --out r20_three
  ifjax prune --model resnet56 --target-flops 0.5 --protect stream1 stream2a stream2b stream3a stream3b --out r56
  ifjax prune --model vgg11_bn --checkpoint runs/vgg11/final --ratio 0.5 --out vgg_if50
  ifjax prune --model resnet56 --ratio 0.5 --groups $(seq 5 31) --synthetic-bn 256 --out r56_if50_bn
  ifjax prune --model resnet20 --target-flops 0.52 --allocation measured --protect stream1 stream2a stream2b \\
      stream3a stream3b --synthetic-bn 256 --out r20_52        # data-free: probes and BNs on synthetic inputs

The output is an ifjax.save checkpoint: variables (BatchNorms folded, or re-estimated with --synthetic-bn), spec
and widths. In Python:
  variables, spec, widths, _ = ifjax.restore("r20_if50")
  module, _ = ifjax.models.get("resnet20", widths=widths)

{_EXIT_CODES}"""

_COMPRESS_EPILOG = f"""examples:
  ifjax compress --model resnet20 --target-flops 0.52 --distill-steps 500 --out r20_52     # no real image
  ifjax compress --model resnet56 --target-flops 0.52 --data unlabelled:500 --distill-steps 500 --out r56_52
  ifjax compress --model digits_cnn --target-flops 0.5 --data labelled --finetune-epochs 2 --out d50
  ifjax eval r20_52

The report (stages, seconds, images, steps) is printed and saved beside the checkpoint as report.json.

{_EXIT_CODES}"""

_TRACE_EPILOG = f"""FACTORY contract:
  MODULE is a dotted module name (importable from the current directory) or a path to a .py file;
  FACTORY names an attribute of it: a callable taking no arguments, or the value itself. It must give
    * (apply_fn, variables, example_args) or (apply_fn, variables, example_args, example_kwargs):
      apply_fn(variables, *example_args, **example_kwargs) is the function to trace; or
    * a flax.linen Module: initialised with jax.random.key(0) on a standard-normal input of --input-shape; or
    * a flax.nnx Module: seen through ifjax.nnx_apply and called on such an input.
  --kwarg KEY=VALUE (repeatable; VALUE a Python literal) adds keyword arguments to the call (and to init).

examples:
  ifjax trace mypackage.nets:make_net --input-shape 1,32,32,3 --kwarg train=False
  ifjax trace nets.py:build --scaling --save-spec spec.json

{_EXIT_CODES}"""


# -- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
  import ifjax

  fmt = argparse.RawDescriptionHelpFormatter
  ap = argparse.ArgumentParser(prog="ifjax", formatter_class=fmt, epilog=_MAIN_EPILOG,
                               description="Intra-Fusion structured pruning (Theus et al., ICLR 2024) of Flax models.")
  ap.add_argument("--version", action="version", version=f"ifjax {ifjax.__version__}")
  sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("prune", formatter_class=fmt, epilog=_PRUNE_EPILOG, help="prune a zoo model and save it",
                     description="Prune (or Intra-Fuse) a zoo model to a ratio or a budget; write an ifjax checkpoint.")
  p.add_argument("--model", required=True, help=f"zoo model ({', '.join(ZOO)}), or MODULE:FACTORY of your own "
                 "(as 'ifjax trace' takes it; traced, saved with its pruned spec)")
  p.add_argument("--checkpoint", type=Path, help="PyTorch weights file, a .npz of Flax arrays by path, or an "
                 "ifjax.save directory (default: the public weights under $IFJAX_DATA; for MODULE:FACTORY, the "
                 "factory's own variables)")
  p.add_argument("--key-map", type=Path, metavar="FILE.json", help="MODULE:FACTORY with a PyTorch --checkpoint: "
                 "{flax path: [torch key, layout]} (layouts conv, dense, vector)")
  p.add_argument("--input-shape", help="MODULE:FACTORY giving a Module: its input shape, e.g. 1,32,32,3")
  p.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE", help="MODULE:FACTORY: a keyword "
                 "argument of the call")
  budget = p.add_mutually_exclusive_group(required=True)
  budget.add_argument("--ratio", type=float, help="neuron sparsity of every selected group, in [0, 1)")
  budget.add_argument("--target-flops", type=float, metavar="FRACTION",
                      help="keep at most this fraction (0, 1) of the dense FLOPs (ifjax.allocate)")
  budget.add_argument("--target-params", type=float, metavar="FRACTION",
                      help="keep at most this fraction (0, 1) of the dense parameters (ifjax.allocate)")
  p.add_argument("--groups", nargs="+", metavar="GROUP", help="group names or paper indices (0 = closest to the "
                 "output); default all")
  p.add_argument("--protect", nargs="+", metavar="GROUP", default=(), help="with a target: groups kept whole")
  p.add_argument("--allocation", choices=("uniform", "global", "sensitivity", "measured"), default="uniform",
                 help="with a target: one ratio for all groups (default), neurons ranked across groups by importance "
                 "(global), or by BN-statistics sensitivity per unit of cost (sensitivity, data-free), or by the "
                 "measured change of the predictions on the --synthetic-bn inputs with each group pruned alone "
                 "(measured, data-free; needs --synthetic-bn)")
  p.add_argument("--method", choices=("if", "default", "neuron_merging", "model_folding"), default="if",
                 help="if: Intra-Fusion (optimal transport); default: keep the most important; neuron_merging: "
                 "Neuron Merging (Kim et al., 2020); model_folding: Model Folding (Wang et al., 2025) (default if)")
  p.add_argument("--merge-threshold", type=float, metavar="COS", help="if: merge only neurons at least this "
                 "similar (cosine), prune the rest; neuron_merging: its threshold (default 0.1)")
  p.add_argument("--repair", choices=("none", "statistics"), help="data-free repair of merged channels' "
                 "statistics from the BNs (default: statistics for model_folding, none otherwise)")
  p.add_argument("--normalization", choices=("paper", "barycentric"), default="paper", help="Intra-Fusion's "
                 "normalization of the transport map (default paper)")
  p.add_argument("--importance", choices=IMPORTANCES, default="l1", help="default l1")
  p.add_argument("--solver", choices=("exact", "sinkhorn"), default="exact", help="OT solver (default exact)")
  p.add_argument("--synthetic-bn", type=int, default=0, metavar="N",
                 help="re-estimate the BatchNorms on N inputs synthesized from the dense model's own BN statistics "
                 "(ifjax.synthesize_inputs; still data-free, minutes on a CPU); default 0: off")
  p.add_argument("--synthetic-steps", type=int, default=200, help="Adam steps per batch of synthetic inputs")
  p.add_argument("--out", type=Path, required=True, help="new checkpoint directory (must not exist)")
  p.set_defaults(run=_prune)

  p = sub.add_parser("compress", formatter_class=fmt, epilog=_COMPRESS_EPILOG, help="the whole recipe to a budget",
                     description="Allocate a budget, fuse or prune, re-estimate BNs, distil or fine-tune as far as "
                     "--data allows (ifjax.compress); write an ifjax checkpoint.")
  p.add_argument("--model", required=True, help=f"zoo model: {', '.join(ZOO)}")
  p.add_argument("--checkpoint", type=Path, help="weights (default: the model's public or shipped weights)")
  budget = p.add_mutually_exclusive_group(required=True)
  budget.add_argument("--target-flops", type=float, metavar="FRACTION", help="keep at most this fraction of the FLOPs")
  budget.add_argument("--target-params", type=float, metavar="FRACTION",
                      help="keep at most this fraction of the parameters")
  p.add_argument("--data", default="none", metavar="none|unlabelled:N|labelled[:N]",
                 help="none: no real image (synthetic inputs); unlabelled:N: the first N training images without "
                 "labels; labelled[:N]: (the first N) labelled training images, for --finetune-epochs (default none)")
  p.add_argument("--method", choices=("if", "default", "neuron_merging", "model_folding"), default="if")
  p.add_argument("--normalization", choices=("paper", "barycentric"), default="barycentric",
                 help="with --method if (default barycentric)")
  p.add_argument("--repair", choices=("none", "statistics"), help="data-free repair of merged channels (default: "
                 "statistics for --method if and model_folding)")
  p.add_argument("--allocation", choices=("measured", "uniform", "global", "sensitivity"), default="measured")
  p.add_argument("--protect", nargs="+", metavar="GROUP", default=(), help="groups kept whole")
  p.add_argument("--calibration", type=int, default=256, help="synthetic or unlabelled calibration inputs")
  p.add_argument("--synthetic-steps", type=int, default=200, help="Adam steps per batch of synthetic inputs")
  p.add_argument("--distill-steps", type=int, default=0, help="distillation steps on the calibration inputs")
  p.add_argument("--finetune-epochs", type=int, default=0, help="with --data labelled: epochs of fine-tuning")
  p.add_argument("--out", type=Path, required=True, help="new checkpoint directory (must not exist)")
  p.set_defaults(run=_compress)

  p = sub.add_parser("eval", formatter_class=fmt, help="test accuracy of a checkpoint or a pretrained model",
                     description="Test accuracy of an ifjax checkpoint directory, a PyTorch weights file (with "
                     "--model), or a zoo model name (its public weights).",
                     epilog="examples:\n  ifjax eval r20_if50 --data cifar10-test --limit 1000\n  ifjax eval resnet56\n"
                     f"  ifjax eval lenet5 --data mnist-test\n\n{_EXIT_CODES}")
  p.add_argument("source", help="checkpoint directory, weights file, or zoo model name")
  p.add_argument("--model", help="zoo model of the checkpoint (default: the zoo model whose spec it holds)")
  p.add_argument("--data", choices=DATASETS, help="test set (default: the model's: cifar10-test, mnist-test, "
                 "imagenet-sample or digits-test)")
  p.add_argument("--limit", type=int, help="first N images (CIFAR-10: a multiple of 10, class-balanced)")
  p.add_argument("--batch-size", type=int, default=500)
  p.set_defaults(run=_eval)

  p = sub.add_parser("trace", formatter_class=fmt, epilog=_TRACE_EPILOG, help="trace a model's spec and check it",
                     description="Print the spec ifjax.trace_spec derives for a model, and the check_spec result.")
  p.add_argument("factory", metavar="MODULE:FACTORY")
  p.add_argument("--input-shape", help="comma-separated input shape for a Module, e.g. 1,32,32,3")
  p.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument of the call")
  p.add_argument("--scaling", action="store_true", help="also check_spec's scaling test (ReLU networks)")
  p.add_argument("--no-check", action="store_true", help="only trace")
  p.add_argument("--save-spec", type=Path, metavar="FILE", help="write the spec as JSON (Spec.from_json reads it)")
  p.set_defaults(run=_trace)

  p = sub.add_parser("experiment", formatter_class=fmt, help="run a script of experiments/ (source tree only)",
                     description="Run one of the experiment scripts of the source repository's experiments/ folder "
                     "in a fresh Python process, with the remaining arguments.",
                     epilog="examples:\n  ifjax experiment data-free --model resnet20 --out results/resnet20_l1\n"
                     "  ifjax experiment budget --help\n\nscripts: " + ", ".join(f"{k} ({v})" for k, v in
                                                                                   EXPERIMENTS.items())
                     + f"\n\n{_EXIT_CODES}; otherwise the script's own exit status")
  p.add_argument("name", choices=sorted(EXPERIMENTS))
  p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script (see 'ifjax experiment NAME --help')")
  p.set_defaults(run=_experiment)
  return ap


def main(argv: list[str] | None = None) -> int:
  """Runs the ``ifjax`` command on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as e:  # --help, --version, usage errors
    return e.code if isinstance(e.code, int) else ExitCode.USAGE
  try:
    return int(args.run(args))
  except CliError as e:
    message = str(e).replace("\n", " ")
    print(f"ifjax {args.command}: error: {message}", file=sys.stderr)
    return int(e.code)


# -- prune ---------------------------------------------------------------------------------------
def _prune(args) -> int:
  import ifjax

  for flag, value in (("--ratio", args.ratio), ("--target-flops", args.target_flops),
                      ("--target-params", args.target_params)):
    low_ok = flag == "--ratio"
    if value is not None and not ((0 <= value if low_ok else 0 < value) and value < 1):
      raise CliError(ExitCode.BAD_RATIO, f"{flag} must be in {'[0' if low_ok else '(0'}, 1), got {value}")
  if ":" in args.model:
    return _prune_factory(args)
  _check_model(args.model)
  _check_new_path("--out", args.out, "checkpoints are never overwritten")
  groups, protect = _group_keys(args.groups), _group_keys(args.protect)

  module, spec, variables = _load(args.model, args.checkpoint)
  if args.ratio is not None:  # a ratio that leaves a group empty is a bad ratio, not a usage error
    try:
      sizes = {g.name: spec.validate(variables)[g.name] for g in spec.select(groups)}
    except ValueError as e:
      raise CliError(ExitCode.USAGE, str(e)) from None
    empty = [f"{g} ({n} neurons)" for g, n in sizes.items() if ifjax.kept_count(n, args.ratio) < 1]
    if empty:
      raise CliError(ExitCode.BAD_RATIO, f"--ratio {args.ratio} keeps no neuron of {', '.join(empty)}; at least one "
                     "must remain")
  dense_params = ifjax.param_count(variables)
  alloc = None
  if args.synthetic_bn < 0 or args.synthetic_bn == 1:
    raise CliError(ExitCode.USAGE, f"--synthetic-bn must be 0 (off) or at least 2, got {args.synthetic_bn}")
  if args.allocation == "measured" and args.ratio is None and not args.synthetic_bn:
    raise CliError(ExitCode.USAGE, "--allocation measured measures on synthetic inputs: give --synthetic-bn N")
  with _stages(3 + (args.ratio is None) + 2 * (args.synthetic_bn > 0)) as stage:
    inputs = None
    if args.synthetic_bn:
      stage("synthesizing inputs")
      inputs = ifjax.synthesize_inputs(_train_apply(module), variables, _input_shape(args.model, "--synthetic-bn"),
                                       count=args.synthetic_bn, steps=args.synthetic_steps, progress=False).inputs
    opts = dict(method=args.method, repair=args.repair)
    if args.method == "if":
      opts.update(normalization=args.normalization, solver=args.solver, merge_threshold=args.merge_threshold)
    elif args.method == "neuron_merging":
      opts.update(merge_threshold=args.merge_threshold)
    if args.ratio is not None:
      ratio = args.ratio
    else:
      stage("allocating")
      alloc = _allocate(args, module, spec, variables, groups, protect, inputs, opts)
      ratio, groups = alloc.ratios, None  # the allocation names every group it may prune
    stage("planning")
    try:
      pl = ifjax.plan(variables, spec, ratio, groups=groups, importance=args.importance, **opts)
    except ValueError as e:
      raise CliError(ExitCode.USAGE, str(e)) from None
    stage("applying")
    small = ifjax.apply_plan(variables, spec, pl)
    widths = ifjax.widths(variables, spec, pl)
    small_module, small_spec = ifjax.models.get(args.model, num_classes=module.num_classes, widths=widths)
    if inputs is not None:
      stage("re-estimating BatchNorms")
      batches = [inputs[i:i + 128] for i in range(0, len(inputs), 128)]
      small = ifjax.recalibrate_batchnorm(_train_apply(small_module), small, variables, spec, pl, batches)
    stage("saving")
    try:
      path = ifjax.save(args.out, small, small_spec, widths)
    except (OSError, ValueError) as e:  # checked up front; a disk that filled or a folder that went meanwhile
      raise CliError(ExitCode.USAGE, f"--out {args.out}: cannot write the checkpoint: {e}") from None
  dense_widths = spec.validate(variables)
  changed = [f"{g} {dense_widths[g]}->{w}" for g, w in widths.items() if w != dense_widths[g]]
  title = {"if": f"Intra-Fusion ({args.normalization})", "default": "default pruning",
           "neuron_merging": "Neuron Merging", "model_folding": "Model Folding"}[args.method]
  print(f"{args.model} {title}: "
        f"{len(changed)} of {len(widths)} groups pruned, params {dense_params:,} -> {ifjax.param_count(small):,}")
  print(textwrap.fill(", ".join(changed) or "nothing removed", 110, initial_indent="  ", subsequent_indent="  "))
  if alloc is not None:
    what = "FLOPs" if args.target_flops is not None else "params"
    share = lambda v: f"{100 * v / alloc.dense_cost:.1f}%"
    print(f"  {what}: {share(alloc.cost)} of dense (target {share(alloc.target)})")
  print(f"wrote {path}")
  return ExitCode.OK


def _compress(args) -> int:
  import json

  import ifjax

  what = "--target-flops" if args.target_flops is not None else "--target-params"
  target = args.target_flops if args.target_flops is not None else args.target_params
  if not 0 < target < 1:
    raise CliError(ExitCode.BAD_RATIO, f"{what} must be in (0, 1), got {target}")
  _check_model(args.model)
  _check_new_path("--out", args.out, "checkpoints are never overwritten")
  kind, _, count = args.data.partition(":")
  if kind not in ("none", "unlabelled", "labelled") or (kind == "none" and count) or (kind == "unlabelled" and
                                                                                      not count.isdigit()):
    raise CliError(ExitCode.USAGE, f"--data expects none, unlabelled:N or labelled[:N], got {args.data!r}")
  if count and (not count.isdigit() or int(count) < 1):
    raise CliError(ExitCode.USAGE, f"--data {args.data}: N must be a positive integer")
  module, spec, variables = _load(args.model, args.checkpoint)
  data = None
  if kind != "none":
    images, labels = _train_set(args.model, int(count) if count else None)
    data = images if kind == "unlabelled" else (images, labels)
  options = {"normalization": args.normalization} if args.method == "if" else {}
  repair = args.repair if args.repair is not None else ("statistics" if args.method in ("if", "model_folding")
                                                        else "none")
  try:
    result = ifjax.compress(args.model, variables, spec, **{what[2:].replace("-", "_"): target}, data=data,
                            method=args.method, plan_options={**options, "repair": repair},
                            allocation=args.allocation, protect=_group_keys(args.protect),
                            calibration=args.calibration, synthetic_steps=args.synthetic_steps,
                            distill_steps=args.distill_steps, finetune_epochs=args.finetune_epochs)
  except ValueError as e:
    code = ExitCode.BAD_RATIO if "budget" in str(e) else ExitCode.USAGE
    raise CliError(code, str(e)) from None
  try:
    path = ifjax.save(args.out, result.variables, result.spec, result.widths)
  except (OSError, ValueError) as e:
    raise CliError(ExitCode.USAGE, f"--out {args.out}: cannot write the checkpoint: {e}") from None
  report = {k: v for k, v in result.report.items()}
  (Path(path) / "report.json").write_text(json.dumps(report, indent=1, default=float))
  share = 100 * report["cost"] / report["dense_cost"]
  print(f"{args.model} compressed ({args.method}): {share:.1f}% of the dense "
        f"{'FLOPs' if args.target_flops is not None else 'params'} in {report['seconds']:.0f} s; "
        f"{report['synthetic_images']} synthetic and {report['real_images']} real images, "
        f"{report['distill_steps']} distillation steps, {report['finetune_epochs']} fine-tuning epochs")
  for stage in report["stages"]:
    print(f"  {stage['stage']}: {stage['seconds']:.1f} s")
  print(f"wrote {path}")
  return ExitCode.OK


def _train_set(name: str, count: int | None):
  """``(images float32 preprocessed, labels)``: the first ``count`` training images of the model's data set."""
  from ifjax import data

  kind = data.MODEL_PREPROCESS.get(name)
  try:
    if kind == "digits":
      x, y = data.digits("train")
      x, y = x[:count], y[:count]
    elif kind == "cifar_resnet":
      x, y = data.cifar10_jpeg("train", limit=count)
    else:
      raise CliError(ExitCode.USAGE, f"--data: no training set known for {name} (cifar10 models and digits_cnn)")
  except data.DataMissingError as e:
    raise CliError(ExitCode.MISSING_DATA, f"--data: {e}") from None
  except ValueError as e:
    raise CliError(ExitCode.USAGE, f"--data: {e}") from None
  return data.preprocess(name, x), y


def _prune_factory(args) -> int:
  """``prune --model MODULE:FACTORY``: a model of the user's own, traced, its weights from ``--checkpoint``."""
  import ifjax

  _check_new_path("--out", args.out, "checkpoints are never overwritten")
  if args.synthetic_bn:
    raise CliError(ExitCode.USAGE, "--synthetic-bn needs a zoo model; prune a MODULE:FACTORY model without it")
  if args.target_flops is None and args.target_params is None and args.allocation != "uniform":
    raise CliError(ExitCode.USAGE, "--allocation applies to --target-flops / --target-params")
  args.factory = args.model
  apply_fn, variables, example_args, example_kwargs = _factory(args)
  spec = None
  if args.checkpoint is not None:
    if args.checkpoint.is_dir():
      variables, spec, _ = _restore(args.checkpoint)
    elif not args.checkpoint.is_file():
      raise CliError(ExitCode.BAD_CHECKPOINT, f"--checkpoint {args.checkpoint}: no such file or directory")
    else:
      variables = _read_weights(args, variables)
  try:
    spec = spec or ifjax.trace_spec(apply_fn, variables, *example_args, **example_kwargs)
  except ifjax.UnsupportedPrimitiveError as e:
    raise CliError(ExitCode.SPEC_FAILED, f"trace_spec cannot follow {args.model}: {e}") from None
  groups, protect = _group_keys(args.groups), _group_keys(args.protect)
  opts = dict(method=args.method, repair=args.repair)
  if args.method == "if":
    opts.update(normalization=args.normalization, solver=args.solver, merge_threshold=args.merge_threshold)
  elif args.method == "neuron_merging":
    opts.update(merge_threshold=args.merge_threshold)
  try:
    ratio = args.ratio
    if ratio is None:
      what = "target_flops" if args.target_flops is not None else "target_params"
      extra: dict[str, Any] = dict(apply_fn=apply_fn, example_args=tuple(example_args),
                                   example_kwargs=example_kwargs) if what == "target_flops" else {}
      alloc = ifjax.allocate(variables, spec, **{what: getattr(args, what)}, method=args.allocation, groups=groups,
                             protect=protect or (), importance=args.importance, **extra)
      ratio, groups = alloc.ratios, None
    pl = ifjax.plan(variables, spec, ratio, groups=groups, importance=args.importance, **opts)
  except ValueError as e:
    code = ExitCode.BAD_RATIO if "budget" in str(e) or "ratio" in str(e) else ExitCode.USAGE
    raise CliError(code, str(e)) from None
  small = ifjax.apply_plan(variables, spec, pl)
  try:
    path = ifjax.save(args.out, small, spec, plan=pl)
  except (OSError, ValueError) as e:
    raise CliError(ExitCode.USAGE, f"--out {args.out}: cannot write the checkpoint: {e}") from None
  widths, dense = pl.widths(), spec.validate(variables)
  changed = [f"{g} {dense[g]}->{w}" for g, w in widths.items() if w != dense[g]]
  print(f"{args.model} ({args.method}): {len(changed)} of {len(widths)} groups pruned, params "
        f"{ifjax.param_count(variables):,} -> {ifjax.param_count(small):,}")
  print(textwrap.fill(", ".join(changed) or "nothing removed", 110, initial_indent="  ", subsequent_indent="  "))
  print(f"wrote {path}  (run it with ifjax.resize(apply_fn, dense_variables, small_variables, x))")
  return ExitCode.OK


def _read_weights(args, template):
  """``--checkpoint`` file into ``template``'s tree: a ``.npz`` keyed by Flax paths, or PyTorch weights with
  ``--key-map`` (JSON ``{flax path: [torch key, layout]}``, layouts conv / dense / vector)."""
  import json

  import numpy as np

  import ifjax

  try:
    if args.checkpoint.suffix == ".npz":
      with np.load(args.checkpoint) as arrays:
        tensors = dict(arrays)
      keys = {k: (k, "vector") for k in tensors}
    else:
      if args.key_map is None:
        raise CliError(ExitCode.USAGE, f"--checkpoint {args.checkpoint} is not an ifjax.save directory or a .npz: "
                       "a PyTorch file needs --key-map FILE.json ({flax path: [torch key, layout]})")
      keys = {k: tuple(v) for k, v in json.loads(args.key_map.read_text()).items()}
      tensors = ifjax.state_dict(ifjax.read_torch(args.checkpoint))
    return ifjax.load_into(template, tensors, keys)
  except (OSError, json.JSONDecodeError) as e:
    raise CliError(ExitCode.BAD_CHECKPOINT, f"--checkpoint {args.checkpoint}: {e}") from None
  except ifjax.CheckpointError as e:
    raise CliError(ExitCode.BAD_CHECKPOINT, f"--checkpoint {args.checkpoint}: {e}") from None


def _train_apply(module):
  """``module.apply`` with a dropout rng, for train-mode passes (EfficientNet's head has dropout)."""
  import jax

  return lambda v, x, **kw: module.apply(v, x, rngs={"dropout": jax.random.key(0)}, **kw)


def _allocate(args, module, spec, variables, groups, protect, inputs, opts):
  import jax.numpy as jnp

  import ifjax

  kwargs = dict(method=args.allocation, groups=groups, protect=protect, importance=args.importance)
  if args.allocation == "measured":
    try:
      probed = [g.name for g in spec.select(groups) if g.name not in {spec[p].name for p in protect}]
    except ValueError as e:
      raise CliError(ExitCode.USAGE, str(e)) from None
    kwargs["curves"] = ifjax.measure_sensitivity(_train_apply(module), variables, spec, inputs, groups=probed,
                                                 importance=args.importance, progress=False, **opts)
  if args.target_flops is not None:
    shape = _input_shape(args.model)
    rebuild = lambda w: ifjax.models.get(args.model, num_classes=module.num_classes, widths=w)[0].apply
    kwargs.update(target_flops=args.target_flops, rebuild=rebuild, example_args=(jnp.zeros((1, *shape)),),
                  example_kwargs=dict(train=False))
  else:
    kwargs.update(target_params=args.target_params)
  try:
    return ifjax.allocate(variables, spec, **kwargs)
  except ValueError as e:
    code = ExitCode.BAD_RATIO if "budget" in str(e) else ExitCode.USAGE
    raise CliError(code, str(e)) from None


def _check_new_path(flag: str, path: Path, why: str):
  """Before any work: ``path`` does not exist and its folder exists and is writable."""
  if path.exists():
    raise CliError(ExitCode.USAGE, f"{flag} {path} exists; {why}: pick a new path")
  parent = path.absolute().parent
  if not parent.is_dir():
    raise CliError(ExitCode.USAGE, f"{flag} {path}: the folder {parent} does not exist")
  if not os.access(parent, os.W_OK):
    raise CliError(ExitCode.USAGE, f"{flag} {path}: the folder {parent} is not writable")


@overload
def _group_keys(tokens: None) -> None: ...
@overload
def _group_keys(tokens: Iterable[str]) -> list[str | int]: ...
def _group_keys(tokens: Iterable[str] | None) -> list[str | int] | None:
  """Command-line group selectors: digits are paper indices, anything else a group name."""
  return None if tokens is None else [int(t) if t.isdigit() else t for t in tokens]


# -- eval ----------------------------------------------------------------------------------------
def _eval(args) -> int:
  import flax.errors
  import jax
  import numpy as np
  from tqdm.auto import tqdm

  import ifjax

  source = Path(args.source)
  if source.exists():
    if args.model is None and source.is_file():
      raise CliError(ExitCode.USAGE, f"{source} is a weights file: say which model it holds with --model")
    name = args.model
    if name is not None:
      _check_model(name)
    if source.is_dir() and name is None:
      variables, spec, widths = _restore(source)
      name = _identify(spec, widths)
      if name is None:
        raise CliError(ExitCode.UNKNOWN_MODEL, f"{source}: the saved spec is that of no zoo model at its widths "
                       f"({', '.join(ifjax.models.names())}); if it is one, say which with --model")
      module = _fit_module(name, variables, spec, widths, source)
    else:
      module, spec, variables = _load(cast(str, name), source)  # given: source is not a checkpoint directory
  else:
    if any(sep in args.source for sep in ("/", os.sep)) or args.source.startswith("."):
      raise CliError(ExitCode.BAD_CHECKPOINT, f"no checkpoint directory or weights file at {source.absolute()}")
    name = args.source
    _check_model(name)
    module, spec, variables = _load(name, None)
  x, y, what = _test_set(cast(str, name), args.data, args.limit)
  if args.batch_size < 1:
    raise CliError(ExitCode.USAGE, f"--batch-size must be positive, got {args.batch_size}")
  predict = jax.jit(lambda v, xb: module.apply(v, xb, train=False).argmax(-1))
  try:
    jax.eval_shape(predict, variables, x[:1])
  except flax.errors.FlaxError as e:  # e.g. ScopeParamShapeError: the variables do not fit the module
    raise CliError(ExitCode.BAD_CHECKPOINT, f"{args.source}: the weights do not fit {name}: {e}") from None
  hits = 0
  for xb, yb in tqdm(ifjax.data.batches(x, y, args.batch_size), desc=f"eval {name}", unit="batch", file=sys.stderr,
                     total=-(-len(y) // args.batch_size), disable=None, leave=False):
    hits += int((np.asarray(predict(variables, xb)) == yb).sum())
  print(f"{name} ({ifjax.param_count(variables):,} params) on {what}, {len(y)} images: "
        f"accuracy {100 * hits / len(y):.2f}% ({hits}/{len(y)})")
  return ExitCode.OK


def _test_set(name: str, which: str | None, limit: int | None):
  """``(x float32 NHWC preprocessed for name, y int32, description)``."""
  from ifjax import data

  kind = data.MODEL_PREPROCESS.get(name)
  default: dict[str | None, str] = {"cifar_resnet": "cifar10-test", "lenet5": "mnist-test",
                                    "efficientnet_lite0": "imagenet-sample", "digits": "digits-test"}
  which = which or default.get(kind)
  if which is None:
    raise CliError(ExitCode.USAGE, f"no default test set for {name}: pass --data ({', '.join(DATASETS)})")
  if limit is not None and limit < 1:
    raise CliError(ExitCode.USAGE, f"--limit must be positive, got {limit}")
  try:
    if which.startswith("cifar10-") and which != "cifar10-lossless":
      x, y = data.cifar10_jpeg(which.split("-")[1], limit=limit)
    else:
      x, y = {"cifar10-lossless": data.cifar10_lossless, "mnist-test": data.mnist_test,
              "imagenet-sample": data.imagenet_sample, "digits-test": data.digits}[which]()
      x, y = x[:limit], y[:limit]
    return data.preprocess(name, x), y, which
  except data.DataMissingError as e:
    raise CliError(ExitCode.MISSING_DATA, f"{which}: {e}") from None
  except ValueError as e:
    raise CliError(ExitCode.USAGE, f"{which}: {e}") from None


def _identify(spec, widths: dict) -> str | None:
  """The zoo model whose spec at ``widths`` is ``spec``, or None."""
  import ifjax

  for name in ifjax.models.names():
    try:
      if ifjax.models.get(name, widths=widths)[1] == spec:
        return name
    except ValueError:  # widths of groups this model does not have
      continue
  return None


# -- loading -------------------------------------------------------------------------------------
def _check_model(name: str):
  import ifjax

  if name not in ifjax.models.names():
    raise CliError(ExitCode.UNKNOWN_MODEL, f"unknown model {name!r}; the zoo has {', '.join(ifjax.models.names())}")


def _load(name: str, checkpoint: Path | None):
  """``(module, spec, variables)`` of a zoo model: public weights, a weights file, or an ifjax checkpoint dir."""
  import ifjax

  if checkpoint is not None and checkpoint.is_dir():
    variables, spec, widths = _restore(checkpoint)
    return _fit_module(name, variables, spec, widths, checkpoint), spec, variables
  if checkpoint is not None and not checkpoint.exists():
    raise CliError(ExitCode.BAD_CHECKPOINT, f"--checkpoint {checkpoint}: no such file or directory")
  if checkpoint is None and name not in ifjax.models.pretrained_names():
    raise CliError(ExitCode.USAGE, f"{name} has no public weights (only {', '.join(ifjax.models.pretrained_names())})"
                   ": pass --checkpoint DIR, an ifjax.save directory (e.g. from 'ifjax experiment train-cifar')")
  if checkpoint is not None and checkpoint.suffix != ".npz":
    try:
      ifjax.models.torch_keys(name)
    except ValueError:
      raise CliError(ExitCode.USAGE, f"{name} has no PyTorch key map (only {', '.join(_torch_models())}): pass "
                     "--checkpoint DIR, an ifjax.save directory, or a .npz of Flax arrays keyed by variable path") \
          from None
  try:
    return ifjax.models.pretrained(name, checkpoint)
  except ifjax.CheckpointError as e:
    raise CliError(ExitCode.BAD_CHECKPOINT, f"{checkpoint}: {e}") from None
  except FileNotFoundError as e:
    raise CliError(ExitCode.MISSING_DATA, str(e)) from None


def _torch_models() -> list[str]:
  import ifjax

  out = []
  for name in ifjax.models.names():
    try:
      ifjax.models.torch_keys(name)
      out.append(name)
    except ValueError:
      continue
  return out


def _restore(path: Path):
  import ifjax

  try:
    variables, spec, widths, _ = ifjax.restore(path)
  except ifjax.CheckpointError as e:
    raise CliError(ExitCode.BAD_CHECKPOINT, str(e)) from None
  return variables, spec, widths or spec.validate(variables)


def _fit_module(name: str, variables, spec, widths, source: Path):
  """The zoo module ``name`` at ``widths``, with the class count of ``variables``' classifier layer, after checking
  that ``spec`` (the checkpoint's) is that model's."""
  import ifjax

  try:
    model_spec = ifjax.models.get(name, widths=widths)[1]
  except ValueError as e:  # widths of groups the model does not have
    model_spec = e
  if model_spec != spec:
    other = _identify(spec, widths)
    raise CliError(ExitCode.BAD_CHECKPOINT, f"{source} does not hold a {name}: its saved spec is not {name}'s at the "
                   f"saved widths (it is {other or 'no zoo model'}'s)")
  try:
    classes = ifjax.models.num_classes(variables, name)
  except (KeyError, TypeError, IndexError) as e:
    raise CliError(ExitCode.BAD_CHECKPOINT, f"{source} does not hold a {name}: no classifier layer {e}") from None
  return ifjax.models.get(name, num_classes=classes, widths=widths)[0]


def _input_shape(name: str, flag: str = "--target-flops") -> tuple[int, ...]:
  from ifjax import data

  kind = data.MODEL_PREPROCESS.get(name)
  if kind is None:
    raise CliError(ExitCode.USAGE, f"{flag} needs the input shape of {name}, which ifjax.data does not know "
                   "(models with one: " + ", ".join(sorted(data.MODEL_PREPROCESS)) + ")")
  return tuple(data.PREPROCESS[kind]["shape"])


class _stages:
  """A tqdm bar over named steps on stderr (shown on terminals only): ``with _stages(n) as stage: stage("x")``."""

  def __init__(self, total: int):
    self.total = total

  def __enter__(self):
    from tqdm.auto import tqdm

    self.bar = tqdm(total=self.total, file=sys.stderr, disable=None, leave=False, bar_format="{desc} {n}/{total}")
    self.started = False
    return self

  def __call__(self, name: str):
    if self.started:
      self.bar.update()
    self.started = True
    self.bar.set_description_str(name)

  def __exit__(self, *exc):
    self.bar.close()


# -- trace ---------------------------------------------------------------------------------------
def _trace(args) -> int:
  import ifjax

  if args.save_spec is not None:
    _check_new_path("--save-spec", args.save_spec, "spec files are never overwritten")
  apply_fn, variables, example_args, example_kwargs = _factory(args)
  try:
    spec = ifjax.trace_spec(apply_fn, variables, *example_args, **example_kwargs)
  except ifjax.UnsupportedPrimitiveError as e:
    raise CliError(ExitCode.SPEC_FAILED, f"trace_spec cannot follow {args.factory}: {e}") from None
  sizes = spec.validate(variables)
  report = {}
  if not args.no_check:
    try:
      report = ifjax.check_spec(apply_fn, variables, spec, *example_args, scaling=args.scaling, **example_kwargs)
    except ifjax.SpecCheckError as e:
      raise CliError(ExitCode.SPEC_FAILED, f"check_spec rejects the traced spec of {args.factory}: {e}") from None
  width = max([len(g.name) for g in spec.groups] + [5])
  count = lambda n, what: f"{n} {what}{'' if n == 1 else 's'}"
  print(f"{args.factory}: {count(len(spec.groups), 'group')}, {count(len(spec.batchnorms), 'batchnorm')}")
  print(f"{'index':>5}  {'group':<{width}}  {'neurons':>7}  {'producers':>9}  {'consumers':>9}"
        + ("  max output change" if report else ""))
  for g in spec.groups:
    change = f"  {report[g.name]:.3g}" if report else ""
    print(f"{spec.paper_index(g.name):>5}  {g.name:<{width}}  {sizes[g.name]:>7}  {len(g.producers):>9}  "
          f"{len(g.consumers):>9}{change}")
  for b in spec.batchnorms:
    print(f"batchnorm {b.bn} folds into {b.layer}")
  if report:
    print(f"check_spec: every group passed ({'permutation and scaling' if args.scaling else 'permutation'})")
  if args.save_spec is not None:
    try:
      with open(args.save_spec, "x") as f:  # "x": never overwrite, even a file made meanwhile
        f.write(spec.to_json())
    except OSError as e:
      raise CliError(ExitCode.USAGE, f"--save-spec {args.save_spec}: cannot write it: {e}") from None
    print(f"wrote {args.save_spec}")
  return ExitCode.OK


def _factory(args):
  """``(apply_fn, variables, example_args, example_kwargs)`` from ``MODULE:FACTORY`` (see the trace epilog)."""
  import ast
  import functools

  import flax.linen as nn
  import jax
  import numpy as np
  from flax import nnx

  import ifjax

  where, sep, attr = args.factory.rpartition(":")
  if not sep or not where or not attr:
    raise CliError(ExitCode.USAGE, f"expected MODULE:FACTORY, got {args.factory!r}")
  kwargs = {}
  for item in args.kwarg:
    key, eq, value = item.partition("=")
    if not eq or not key.isidentifier():
      raise CliError(ExitCode.USAGE, f"--kwarg expects KEY=VALUE, got {item!r}")
    try:
      kwargs[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      kwargs[key] = value
  module = _import(where)
  if not hasattr(module, attr):
    raise CliError(ExitCode.USAGE, f"{where} has no attribute {attr!r}")
  made = getattr(module, attr)
  if callable(made) and not isinstance(made, (nn.Module, nnx.Module)):
    made = made()
  if isinstance(made, (nn.Module, nnx.Module)):
    if args.input_shape is None:
      raise CliError(ExitCode.USAGE, f"{args.factory} gives a {type(made).__name__} module: pass --input-shape")
    try:
      shape = tuple(int(n) for n in args.input_shape.split(","))
    except ValueError:
      raise CliError(ExitCode.USAGE, f"--input-shape expects integers like 1,32,32,3, got {args.input_shape!r}") \
          from None
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    if isinstance(made, nnx.Module):
      apply_fn, variables = ifjax.nnx_apply(made)
    else:  # one compiled init instead of an eager compile per initializer
      apply_fn, variables = made.apply, jax.jit(functools.partial(made.init, **kwargs))(jax.random.key(0), x)
    return apply_fn, variables, (x,), kwargs
  if isinstance(made, (tuple, list)) and len(made) in (3, 4) and callable(made[0]):
    example_args = made[2] if isinstance(made[2], (tuple, list)) else (made[2],)
    return made[0], made[1], tuple(example_args), {**(made[3] if len(made) == 4 else {}), **kwargs}
  raise CliError(ExitCode.USAGE, f"{args.factory} gave a value of type {type(made).__name__}; expected "
                 "(apply_fn, variables, example_args[, example_kwargs]) or a flax Module (see 'ifjax trace --help')")


def _import(where: str):
  """A module by file path (``nets.py``, ``dir/nets.py``) or dotted name (importable from the current directory)."""
  if where.endswith(".py") or os.sep in where or "/" in where:
    path = Path(where)
    if not path.is_file():
      raise CliError(ExitCode.USAGE, f"no Python file {path.absolute()}")
    # (None for a file without a Python suffix: module_from_spec then fails on it, as before)
    spec = cast(importlib.machinery.ModuleSpec, importlib.util.spec_from_file_location(path.stem, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)  # pyright: ignore[reportOptionalMemberAccess] (a file location has a loader)
    return module
  if "" not in sys.path and os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    return importlib.import_module(where)
  except ModuleNotFoundError as e:
    if e.name is None or not (where == e.name or where.startswith(e.name + ".")):
      raise  # the user's module imports something missing: their traceback helps
    raise CliError(ExitCode.USAGE, f"cannot import {where!r} (no module {e.name!r}; looked in the current directory "
                   "and sys.path)") from None


# -- experiment ---------------------------------------------------------------------------------
def experiment_dirs() -> list[Path]:
  """Where ``ifjax experiment`` looks for the scripts: ``$IFJAX_EXPERIMENTS`` if set, else ``experiments/`` of
  the source tree (an editable install's repository root), then of the current directory."""
  import ifjax

  env = os.environ.get("IFJAX_EXPERIMENTS")
  if env:
    return [Path(env)]
  return [Path(ifjax.__file__).resolve().parent.parent / "experiments", Path.cwd() / "experiments"]


def _experiment(args) -> int:
  looked = experiment_dirs()
  script = next((d / EXPERIMENTS[args.name] for d in looked if (d / EXPERIMENTS[args.name]).is_file()), None)
  if script is None:
    raise CliError(ExitCode.NO_EXPERIMENTS, f"no {EXPERIMENTS[args.name]} in {' or '.join(map(str, looked))}: the "
                   "experiment scripts come with the source repository, not the package; run from a clone "
                   "(pip install -e .) or set IFJAX_EXPERIMENTS to its experiments/ folder")
  # a fresh process: split_data.py sets XLA flags before jax starts, which this process has imported already
  return subprocess.call([sys.executable, str(script), *args.args])
