r"""Train a zoo model (the paper's VGG11-BN or ResNet18, or a CIFAR ResNet) from scratch on CIFAR-10 JPEG.

The paper's recipe (Table 2): SGD, momentum 0.9, lr 0.05 halved every 30 epochs, batch 128, flip +
random crop, cross-entropy, CIFAR normalised with the ImageNet constants. Data-parallel over every
local device. Resumable: a rerun with the same ``--checkpoint-dir`` continues after the last complete
epoch (so a long run can be spread over several sessions). The final model is written with
``ifjax.save`` to ``--out`` and can be fed to the data-free grid:

    python experiments/train_cifar.py --model vgg11_bn --epochs 30 --checkpoint-dir runs/vgg11 --out runs/vgg11/final
    python experiments/train_cifar.py --model resnet18 --epochs 60 --halve-every 6 --time-limit 3000 \
        --checkpoint-every 5 --checkpoint-dir runs/r18 --out runs/r18/final
    python experiments/data_free.py --model vgg11_bn --checkpoint runs/vgg11/final --out results/vgg11_l1
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp

import ifjax
from ifjax import data, train


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="vgg11_bn", help="vgg11_bn, resnet18, resnet20, ...")
  ap.add_argument("--epochs", type=int, default=30)
  ap.add_argument("--train-limit", type=int, default=None, help="class-balanced training subset")
  ap.add_argument("--test-limit", type=int, default=None, help="class-balanced test subset (default: all 10,000)")
  ap.add_argument("--batch-size", type=int, default=128)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--halve-every", type=int, default=30,
                  help="epochs between lr halvings (paper: 30 over 300 epochs; --epochs / 10 compresses that)")
  ap.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
  ap.add_argument("--time-limit", type=float, default=None,
                  help="seconds: stop after the first epoch that ends later (rerun to continue)")
  ap.add_argument("--checkpoint-dir", type=pathlib.Path, required=True)
  ap.add_argument("--out", type=pathlib.Path, required=True, help="ifjax.save directory of the final model")
  args = ap.parse_args(argv)

  x, y = data.cifar10_jpeg("train", limit=args.train_limit)
  train_set = (data.preprocess(args.model, x), y)
  xt, yt = data.cifar10_jpeg("test", limit=args.test_limit)
  test_set = (data.preprocess(args.model, xt), yt)
  module, spec = ifjax.models.get(args.model)
  variables = module.init(jax.random.key(args.seed), jnp.zeros((1, 32, 32, 3)))
  mesh = train.make_mesh({"data": jax.local_device_count()}, jax.local_devices())
  t0 = time.perf_counter()
  variables, history = train.fit(module, variables, train_set, epochs=args.epochs, mesh=mesh,
                                 optimizer=lambda s: train.paper_sgd("train", s, every=args.halve_every),
                                 eval_data=test_set, checkpoint_every=args.checkpoint_every, time_limit=args.time_limit,
                                 checkpoint_dir=args.checkpoint_dir.resolve(), batch_size=args.batch_size,
                                 seed=args.seed, augment=train.flip_crop(4, fill=data.black_pixel(args.model)))
  ifjax.save(args.out.resolve(), variables, spec)
  (args.out.parent / f"{args.out.name}_history.json").write_text(json.dumps(history, indent=1))
  for h in history:
    print(f"epoch {h['epoch']:3d}: loss {h['loss']:.4f}, train {100 * h['accuracy']:.2f}%, "
          f"test {100 * h['eval_accuracy']:.2f}%, {h['seconds']:.0f} s")
  print(f"{args.model}: {100 * history[-1]['eval_accuracy']:.2f}% on {len(yt)} test images after "
        f"{len(history)} of {args.epochs} epochs (lr halved every {args.halve_every}); "
        f"this call {time.perf_counter() - t0:.0f} s; saved to {args.out}")


if __name__ == "__main__":
  main()
