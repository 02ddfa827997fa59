"""The ``ifjax`` command, run for real in subprocesses (``python -m ifjax``; the console script where installed).

Variants of paths a subprocess already covers run in-process through ``ifjax.cli.main``, the same code without
another second of imports each."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest

import ifjax
from ifjax import data
from ifjax.cli import ExitCode, main

HELPERS = Path(__file__).with_name("cli_models.py")


def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
  """``python -m ifjax ARGS`` with ``env`` added to the environment; stdout and stderr captured as text."""
  return subprocess.run([sys.executable, "-m", "ifjax", *map(str, args)], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=600)


def accuracy_line(stdout: str) -> tuple[int, int]:
  """``(hits, images)`` of eval's result line."""
  m = re.search(r"accuracy [\d.]+% \((\d+)/(\d+)\)", stdout)
  assert m, stdout
  return int(m.group(1)), int(m.group(2))


def hits_in_process(name: str, variables, widths, x, y) -> int:
  module, _ = ifjax.models.get(name, widths=widths)
  logits = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  return int((np.asarray(logits).argmax(-1) == y).sum())


# -- help and the console script -----------------------------------------------------------------
def test_help_shows_commands_examples_and_exit_codes(capsys):
  out = run_cli("--help")
  assert out.returncode == 0, out.stderr
  for word in ("prune", "eval", "trace", "experiment", "examples:", "IFJAX_DATA", "3 missing data"):
    assert word in out.stdout
  for command, words in (("prune", ("--target-flops", "--normalization", "ifjax.restore")),
                         ("eval", ("--limit", "cifar10-test")), ("trace", ("FACTORY contract", "--input-shape")),
                         ("experiment", ("data-free", "split-data"))):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and all(w in text for w in words), (command, text)


def test_help_imports_nothing_heavy():
  """``ifjax --help`` is instant: the parser's model and importance lists are constants, checked here."""
  code = ("import sys, contextlib, io\nfrom ifjax.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
          "  main(['--help']); main(['prune', '--help']); main(['compress', '--help'])\n"
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'optax', 'numpy'}))")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
  assert out.strip() == "[]", out
  from ifjax import cli

  assert list(cli.ZOO) == ifjax.models.names() and list(cli.IMPORTANCES) == sorted(ifjax.importance.BUILTIN)


def test_console_script_is_installed():
  script = shutil.which("ifjax", path=str(Path(sys.executable).parent)) or shutil.which("ifjax")
  if script is None:
    pytest.skip("no 'ifjax' console script on PATH: pip install -e . installs it")
  out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == f"ifjax {ifjax.__version__}", out


# -- prune -> eval on the real ResNet20 ---------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
  """The real ResNet20 Intra-Fused at 50% by ``ifjax prune``: ``(checkpoint dir, stdout)``."""
  out = tmp_path_factory.mktemp("cli") / "r20_if50"
  res = run_cli("prune", "--model", "resnet20", "--ratio", "0.5", "--method", "if", "--out", out)
  assert res.returncode == 0, res.stderr
  return out, res.stdout


@pytest.mark.requires_data(models=("resnet20",))
def test_prune_writes_what_the_library_computes(pruned):
  out, stdout = pruned
  module, spec, dense = ifjax.models.pretrained("resnet20")
  pl = ifjax.plan(dense, spec, 0.5)
  expected, widths = ifjax.apply_plan(dense, spec, pl), ifjax.widths(dense, spec, pl)
  variables, saved_spec, saved_widths, state = ifjax.restore(out)
  assert state is None and saved_widths == widths
  assert saved_spec == ifjax.models.get("resnet20", widths=widths)[1]
  got = jax.tree_util.tree_leaves_with_path(variables)
  assert [p for p, _ in got] == [p for p, _ in jax.tree_util.tree_leaves_with_path(expected)]
  for (path, a), b in zip(got, jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  assert f"params 269,722 -> {ifjax.param_count(expected):,}" in stdout and "14 of 14 groups pruned" in stdout


@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20",))
def test_eval_of_pruned_and_dense_matches_in_process(pruned):
  out, _ = pruned
  x, y = data.cifar10_jpeg("test", limit=100)
  x = data.preprocess("resnet20", x)
  variables, _, widths, _ = ifjax.restore(out)
  res = run_cli("eval", out, "--data", "cifar10-test", "--limit", 100)
  assert res.returncode == 0, res.stderr
  assert accuracy_line(res.stdout) == (hits_in_process("resnet20", variables, widths, x, y), 100)
  assert res.stdout.startswith("resnet20 ")  # the model was identified from the saved spec
  res = run_cli("eval", "resnet20", "--limit", 100)
  assert res.returncode == 0, res.stderr
  hits, n = accuracy_line(res.stdout)
  assert (hits, n) == (hits_in_process("resnet20", ifjax.models.pretrained("resnet20")[2], {}, x, y), 100)
  assert hits >= 70  # the dense model scores 81% on the JPEG test set: preprocessing and weights are right


@pytest.mark.requires_data("cifar10-jpeg.zip", models=("resnet20",))
def test_eval_rejects_a_checkpoint_of_another_model(pruned, capsys):
  assert main(["eval", str(pruned[0]), "--model", "resnet32", "--limit", "10"]) == ExitCode.BAD_CHECKPOINT
  err = capsys.readouterr().err
  assert "does not hold a resnet32" in err and "(it is resnet20's)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.requires_data(models=("resnet20",))
def test_prune_again_from_a_checkpoint_directory(pruned, tmp_path, capsys):
  argv = ["prune", "--model", "resnet20", "--checkpoint", str(pruned[0]), "--ratio", "0.5", "--groups", "0",
          "layer1_0/conv1", "--method", "default", "--out", str(tmp_path / "again")]
  assert main(argv) == 0
  _, _, before, _ = ifjax.restore(pruned[0])
  _, spec, after, _ = ifjax.restore(tmp_path / "again")
  assert {g for g in after if after[g] != before[g]} == {spec.names[-1], "layer1_0/conv1"}  # paper index 0: the last
  assert after["layer1_0/conv1"] == ifjax.kept_count(before["layer1_0/conv1"], 0.5)
  assert "default pruning: 2 of 14 groups pruned" in capsys.readouterr().out


@pytest.mark.requires_data(models=("resnet20",))
def test_prune_with_synthetic_batchnorm_calibration(tmp_path, capsys):
  argv = ["prune", "--model", "resnet20", "--ratio", "0.5", "--groups", "layer1_0/conv1", "layer3_2/conv1",
          "--synthetic-bn", "8", "--synthetic-steps", "2", "--out", str(tmp_path / "c")]
  assert main(argv) == 0
  got, _, widths, _ = ifjax.restore(tmp_path / "c")
  module, spec, dense = ifjax.models.pretrained("resnet20")
  pl = ifjax.plan(dense, spec, 0.5, groups=["layer1_0/conv1", "layer3_2/conv1"])
  made = ifjax.synthesize_inputs(module.apply, dense, (32, 32, 3), count=8, steps=2, progress=False)
  small = ifjax.models.get("resnet20", widths=widths)[0]
  want = ifjax.recalibrate_batchnorm(small.apply, ifjax.apply_plan(dense, spec, pl), dense, spec, pl, [made.inputs])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  var = np.asarray(got["batch_stats"]["layer1_0"]["bn2"]["var"])
  assert not np.allclose(var, 1 - 1e-5)  # re-estimated, not the folded identity
  assert main(["prune", "--model", "resnet20", "--ratio", "0.5", "--synthetic-bn", "1", "--out",
               str(tmp_path / "e")]) == ExitCode.USAGE
  assert "--synthetic-bn must be 0 (off) or at least 2" in capsys.readouterr().err


@pytest.mark.requires_data(models=("resnet20",))
def test_prune_with_a_measured_allocation(tmp_path, capsys):
  """--allocation measured probes the selected groups on the --synthetic-bn inputs: the same widths as
  synthesize_inputs + measure_sensitivity + allocate in-process; without --synthetic-bn it is a usage error."""
  groups = ["layer1_0/conv1", "layer2_1/conv1", "layer3_2/conv1"]
  argv = ["prune", "--model", "resnet20", "--target-params", "0.8", "--allocation", "measured", "--method",
          "default", "--groups", *groups, "--synthetic-bn", "8", "--synthetic-steps", "2", "--out", str(tmp_path / "m")]
  assert main(argv) == 0
  _, _, widths, _ = ifjax.restore(tmp_path / "m")
  module, spec, dense = ifjax.models.pretrained("resnet20")
  made = ifjax.synthesize_inputs(module.apply, dense, (32, 32, 3), count=8, steps=2, progress=False)
  curves = ifjax.measure_sensitivity(module.apply, dense, spec, made.inputs, groups=groups, progress=False, fuse=False)
  alloc = ifjax.allocate(dense, spec, target_params=0.8, method="measured", curves=curves, groups=groups)
  assert {g: widths[g] for g in groups} == alloc.kept
  assert main(argv[:-6] + ["--out", str(tmp_path / "e")]) == ExitCode.USAGE
  assert "--allocation measured measures on synthetic inputs: give --synthetic-bn N" in capsys.readouterr().err


@pytest.mark.requires_data(models=("lenet5",))
def test_prune_to_a_parameter_budget(tmp_path):
  res = run_cli("prune", "--model", "lenet5", "--target-params", "0.3", "--method", "default", "--out", tmp_path / "c")
  assert res.returncode == 0, res.stderr
  variables, spec, widths, _ = ifjax.restore(tmp_path / "c")
  dense = ifjax.param_count(ifjax.models.pretrained("lenet5")[2])
  assert ifjax.param_count(variables) <= 0.3 * dense
  # the budget is met to within one neuron per group: one more in each would exceed it
  bigger = ifjax.models.get("lenet5", widths={g: w + 1 for g, w in widths.items()})[0]
  shapes = jax.eval_shape(bigger.init, jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
  assert ifjax.param_count(shapes) > 0.3 * dense
  assert "params: " in res.stdout and "% of dense (target 30.0%)" in res.stdout


@pytest.mark.slow
@pytest.mark.requires_data(models=("resnet20",))
def test_prune_to_a_flop_budget(tmp_path):
  res = run_cli("prune", "--model", "resnet20", "--target-flops", "0.5", "--method", "default", "--out", tmp_path / "c")
  assert res.returncode == 0, res.stderr
  variables, _, widths, _ = ifjax.restore(tmp_path / "c")
  module, _, dense = ifjax.models.pretrained("resnet20")
  x = jax.numpy.zeros((1, 32, 32, 3))
  small = ifjax.models.get("resnet20", widths=widths)[0]
  assert ifjax.flops(small.apply, variables, x, train=False) <= 0.5 * ifjax.flops(module.apply, dense, x, train=False)


# -- trace ---------------------------------------------------------------------------------------
def test_trace_prints_the_spec_and_the_check():
  res = run_cli("trace", f"{HELPERS}:linen_net", "--input-shape", "2,8,8,3", "--kwarg", "train=False", "--scaling")
  assert res.returncode == 0, res.stderr
  rows = {line.split()[1]: line.split() for line in res.stdout.splitlines()[2:4]}
  assert rows["conv"][:5] == ["1", "conv", "6", "2", "1"] and rows["hidden"][:5] == ["0", "hidden", "5", "2", "1"]
  assert "batchnorm bn folds into conv" in res.stdout
  assert "check_spec: every group passed (permutation and scaling)" in res.stdout


def test_trace_of_an_apply_tuple_saves_the_traced_spec(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(HELPERS.parent)  # MODULE as a dotted name, imported from the current directory
  monkeypatch.setattr(sys, "path", list(sys.path))  # which the command puts on sys.path
  try:
    assert main(["trace", f"{HELPERS.stem}:apply_triple", "--save-spec", str(tmp_path / "spec.json")]) == 0
  finally:
    helpers = sys.modules.pop(HELPERS.stem)
  apply_fn, variables, args, kwargs = helpers.apply_triple()
  saved = ifjax.Spec.from_json((tmp_path / "spec.json").read_text())
  assert saved == ifjax.trace_spec(apply_fn, variables, *args, **kwargs)
  assert "check_spec: every group passed (permutation)" in capsys.readouterr().out


def test_trace_of_an_nnx_module(capsys):
  try:
    assert main(["trace", f"{HELPERS}:nnx_net", "--input-shape", "2,3", "--scaling"]) == 0
  finally:
    sys.modules.pop(HELPERS.stem, None)
  out = capsys.readouterr().out
  assert "1 group, 0 batchnorms" in out and out.splitlines()[2].split()[:5] == ["0", "hidden", "4", "2", "1"]


def test_trace_of_an_unsupported_op_exits_7():
  res = run_cli("trace", f"{HELPERS}:sorted_net", "--input-shape", "2,8,8,3")
  assert res.returncode == ExitCode.SPEC_FAILED and "no rule for primitive 'sort'" in res.stderr
  assert res.stderr.startswith("ifjax trace: error: ") and "Traceback" not in res.stderr


def test_prune_and_eval_the_shipped_digits_cnn(tmp_path):
  """No data folder at all: the weights ship with ifjax and the test digits with scikit-learn; the CLI's
  accuracy is the main job's (all groups at 0.5, IF paper: 59.33%)."""
  env = {"IFJAX_DATA": str(tmp_path / "empty")}
  res = run_cli("prune", "--model", "digits_cnn", "--ratio", "0.5", "--out", tmp_path / "d50", env=env)
  assert res.returncode == 0, res.stderr
  assert "conv0 32->16, conv1 64->32, conv2 128->64" in res.stdout
  res = run_cli("eval", tmp_path / "d50", env=env)
  assert res.returncode == 0, res.stderr
  assert accuracy_line(res.stdout) == (267, 450) and "digits-test" in res.stdout
  assert main(["eval", "digits_cnn"]) == 0


def test_compress_writes_a_checkpoint_eval_reads(tmp_path):
  """The whole recipe from the command line, data-free, on the shipped digits CNN; the report lies beside it."""
  env = {"IFJAX_DATA": str(tmp_path / "empty")}
  res = run_cli("compress", "--model", "digits_cnn", "--target-flops", "0.5", "--allocation", "uniform",
                "--calibration", "32", "--synthetic-steps", "3", "--distill-steps", "2", "--out", tmp_path / "c50",
                env=env)
  assert res.returncode == 0, res.stderr
  assert "32 synthetic and 0 real images, 2 distillation steps" in res.stdout
  assert (tmp_path / "c50" / "report.json").is_file()
  res = run_cli("eval", tmp_path / "c50", env=env)
  assert res.returncode == 0 and "on digits-test, 450 images" in res.stdout, res.stderr


def test_prune_a_model_of_your_own_from_a_factory(tmp_path, capsys):
  """--model MODULE:FACTORY: traced, weights from a .npz by Flax path, saved with its pruned spec (no zoo)."""
  import sys as _sys

  _sys.path.insert(0, str(HELPERS.parent))
  try:
    from cli_models import ConvNet
  finally:
    _sys.path.remove(str(HELPERS.parent))
  x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
  v = jax.tree.map(np.asarray, ConvNet().init(jax.random.key(3), x))
  flat = {"/".join(p.key for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(v)[0]}
  np.savez(tmp_path / "w.npz", **flat)
  base = ["prune", "--model", f"{HELPERS}:linen_net", "--input-shape", "2,8,8,3", "--kwarg", "train=False"]
  assert main([*base, "--checkpoint", str(tmp_path / "w.npz"), "--ratio", "0.5", "--out", str(tmp_path / "r")]) == 0
  small, spec, widths, _ = ifjax.restore(tmp_path / "r")
  traced = ifjax.trace_spec(ConvNet().apply, v, x, train=False)
  want = ifjax.intra_fuse(v, traced, 0.5)
  assert widths == {"conv": 3, "hidden": 2} and spec.validate(small) == widths
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), small, want)
  assert main([*base, "--target-flops", "0.6", "--out", str(tmp_path / "f")]) == 0
  assert "groups pruned" in capsys.readouterr().out
  (tmp_path / "w.pt").write_bytes(b"not read")
  assert main([*base, "--checkpoint", str(tmp_path / "w.pt"), "--ratio", "0.5", "--out", str(tmp_path / "t")]) \
      == ExitCode.USAGE
  assert "needs --key-map" in capsys.readouterr().err


# -- errors: one line, a distinct exit code ------------------------------------------------------------
# One case per exit code runs as a real subprocess; the other cases run in-process through main(), which is the
# same code path without another ~1 s of imports each.
CASES = ["usage", "not-a-number", "ratio-1", "ratio-negative", "flops-0", "unknown-model", "unknown-model-eval",
         "out-exists", "no-weights", "missing-weights", "not-a-checkpoint", "garbage-torch-file", "no-such-checkpoint",
         "bad-factory", "no-input-shape", "no-module", "not-homogeneous", "no-experiments", "missing-images",
         "ratio-empties-a-group", "out-folder-missing", "spec-exists", "spec-folder-missing", "compress-data",
         "compress-flops"]
ARGPARSE = {"usage", "not-a-number"}  # argparse prints the usage before its one-line message
SUBPROCESS = {"usage", "ratio-1", "unknown-model", "missing-weights", "not-a-checkpoint", "no-experiments"}


def _error_cases(tmp: Path) -> list[tuple[str, list, dict, int, list[str]]]:
  """``(id, args, env, exit code, words in the message)``; the commands fail before any real work."""
  (tmp / "not_a_checkpoint").mkdir()
  (tmp / "not_a_checkpoint" / "notes.txt").write_text("hello")
  (tmp / "garbage.th").write_bytes(b"this is not a torch file")
  (tmp / "exists").mkdir()
  empty = tmp / "empty_data"
  empty.mkdir()
  out = ["--out", tmp / "new"]
  cases = [
      ("usage", ["prune", "--model", "resnet20", "--ratio", "0.5"], {}, ExitCode.USAGE, ["--out"]),
      ("not-a-number", ["prune", "--model", "resnet20", "--ratio", "half", *out], {}, ExitCode.USAGE, ["--ratio"]),
      ("ratio-1", ["prune", "--model", "resnet20", "--ratio", "1", *out], {}, ExitCode.BAD_RATIO,
       ["--ratio must be in [0, 1), got 1.0"]),
      ("ratio-negative", ["prune", "--model", "resnet20", "--ratio", "-0.1", *out], {}, ExitCode.BAD_RATIO,
       ["--ratio must be in [0, 1)"]),
      ("flops-0", ["prune", "--model", "resnet20", "--target-flops", "0", *out], {}, ExitCode.BAD_RATIO,
       ["--target-flops must be in (0, 1)"]),
      ("unknown-model", ["prune", "--model", "resnet21", "--ratio", "0.5", *out], {}, ExitCode.UNKNOWN_MODEL,
       ["unknown model 'resnet21'", "resnet20"]),
      ("unknown-model-eval", ["eval", "resnet21"], {}, ExitCode.UNKNOWN_MODEL, ["unknown model 'resnet21'"]),
      ("out-exists", ["prune", "--model", "resnet20", "--ratio", "0.5", "--out", tmp / "exists"], {},
       ExitCode.USAGE, ["exists"]),
      ("no-weights", ["prune", "--model", "vgg11_bn", "--ratio", "0.5", *out], {}, ExitCode.USAGE,
       ["vgg11_bn has no public weights", "--checkpoint"]),
      ("missing-weights", ["prune", "--model", "resnet20", "--ratio", "0.5", *out], {"IFJAX_DATA": str(empty)},
       ExitCode.MISSING_DATA, [str(empty / "models" / "resnet20-12fca82f.th"), "IFJAX_DATA"]),
      ("not-a-checkpoint", ["prune", "--model", "resnet20", "--checkpoint", tmp / "not_a_checkpoint",
                            "--ratio", "0.5", *out], {}, ExitCode.BAD_CHECKPOINT, ["is not an ifjax checkpoint"]),
      ("garbage-torch-file", ["prune", "--model", "resnet20", "--checkpoint", tmp / "garbage.th", "--ratio", "0.5",
                              *out], {}, ExitCode.BAD_CHECKPOINT, ["garbage.th"]),
      ("no-such-checkpoint", ["eval", tmp / "nowhere"], {}, ExitCode.BAD_CHECKPOINT,
       ["no checkpoint directory or weights file at"]),
      ("bad-factory", ["trace", f"{HELPERS}:NOT_A_MODEL"], {}, ExitCode.USAGE, ["value of type int", "apply_fn"]),
      ("no-input-shape", ["trace", f"{HELPERS}:linen_net"], {}, ExitCode.USAGE, ["--input-shape"]),
      ("no-module", ["trace", "no_such_module_xyz:make"], {}, ExitCode.USAGE, ["cannot import 'no_such_module_xyz'"]),
      ("not-homogeneous", ["trace", f"{HELPERS}:tanh_net", "--input-shape", "2,8,8,3", "--scaling"], {},
       ExitCode.SPEC_FAILED, ["check_spec rejects", "group 'hidden'", "scaling"]),
      ("no-experiments", ["experiment", "budget", "--out", tmp / "b"], {"IFJAX_EXPERIMENTS": str(tmp / "none")},
       ExitCode.NO_EXPERIMENTS, ["no budget.py in", "IFJAX_EXPERIMENTS"]),
      # the shipped digits CNN: no data folder needed
      ("ratio-empties-a-group", ["prune", "--model", "digits_cnn", "--ratio", "0.99", *out], {}, ExitCode.BAD_RATIO,
       ["--ratio 0.99 keeps no neuron of conv0 (32 neurons)"]),
      ("out-folder-missing", ["prune", "--model", "digits_cnn", "--ratio", "0.5", "--out", tmp / "no" / "dir"], {},
       ExitCode.USAGE, ["--out", "does not exist"]),
      ("spec-exists", ["trace", f"{HELPERS}:linen_net", "--input-shape", "2,8,8,3", "--save-spec",
                       tmp / "exists"], {}, ExitCode.USAGE, ["--save-spec", "exists", "never overwritten"]),
      ("compress-data", ["compress", "--model", "digits_cnn", "--target-flops", "0.5", "--data", "some", *out], {},
       ExitCode.USAGE, ["--data expects none, unlabelled:N or labelled[:N]"]),
      ("compress-flops", ["compress", "--model", "digits_cnn", "--target-flops", "1.5", *out], {}, ExitCode.BAD_RATIO,
       ["--target-flops must be in (0, 1)"]),
      ("spec-folder-missing", ["trace", f"{HELPERS}:linen_net", "--input-shape", "2,8,8,3", "--save-spec",
                               tmp / "no" / "spec.json"], {}, ExitCode.USAGE, ["--save-spec", "does not exist"]),
  ]
  weights = ifjax.models.checkpoint_path("resnet20")
  if weights.is_file():  # the weights load, the test images are missing
    cases.append(("missing-images", ["eval", weights, "--model", "resnet20", "--limit", "10"],
                  {"IFJAX_DATA": str(empty)}, ExitCode.MISSING_DATA, [str(empty / "cifar10-jpeg.zip"), "IFJAX_DATA"]))
  return cases


@pytest.fixture(scope="module")
def error_cases(tmp_path_factory):
  """``{id: (case, stderr and exit code of the subprocess, or None)}``; the subprocesses run two at a time."""
  cases = _error_cases(tmp_path_factory.mktemp("errors"))
  real = [c for c in cases if c[0] in SUBPROCESS]
  with ThreadPoolExecutor(2) as pool:
    done = dict(zip([c[0] for c in real], pool.map(lambda c: run_cli(*c[1], env=c[2]), real)))
  return {c[0]: (c, done.get(c[0])) for c in cases}


def test_exit_codes_are_distinct():
  assert len({int(code) for code in ExitCode}) == len(ExitCode) and ExitCode.USAGE == 2


@pytest.mark.parametrize("name", CASES)
def test_error_gives_one_line_and_its_exit_code(name, error_cases, capsys, monkeypatch):
  if name not in error_cases:
    pytest.skip(f"{ifjax.models.checkpoint_path('resnet20')} not found; set IFJAX_DATA (see ../shared/data/README.md)")
  (_, args, env, code, words), res = error_cases[name]
  if res is None:
    for k, v in env.items():
      monkeypatch.setenv(k, v)
    returncode, stderr = main([str(a) for a in args]), capsys.readouterr().err
    sys.modules.pop(HELPERS.stem, None)  # a trace case loaded the helpers
  else:
    returncode, stderr = res.returncode, res.stderr
  assert returncode == code, (args, returncode, stderr)
  lines = stderr.strip().splitlines()
  assert lines[-1].startswith(f"ifjax {args[0]}: error: ") and all(w in lines[-1] for w in words), stderr
  assert len(lines) == 1 or name in ARGPARSE, stderr


def test_experiment_runs_the_script_with_its_arguments(capfd):
  assert main(["experiment", "budget", "--help"]) == 0  # the script runs in a child process
  out = capfd.readouterr().out
  assert "usage: budget.py" in out and "--flops" in out
