"""``python -m adacov.data.prepare --dataset cifar100|fashion_mnist --root data``: get and verify a dataset before a sweep."""

from __future__ import annotations

import argparse
import sys

from adacov.cli import exit_on_run_error
from adacov.data.cifar100 import load_cifar100
from adacov.data.fashion_mnist import load_fashion_mnist

LOADERS = {"cifar100": ("CIFAR-100", load_cifar100), "fashion_mnist": ("Fashion-MNIST", load_fashion_mnist)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download (where needed) and verify a dataset.")
    parser.add_argument("--dataset", choices=sorted(LOADERS), default="cifar100")
    parser.add_argument("--root", default="data")
    parser.add_argument("--no-download", action="store_true")
    args = parser.parse_args(argv)
    with exit_on_run_error():
        name, load = LOADERS[args.dataset]
        data = load(args.root, download=not args.no_download)
    print(f"{name} ready: {len(data.train_y)} train, {len(data.test_y)} test images, verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
