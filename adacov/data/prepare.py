"""``python -m adacov.data.prepare --root data``: fetch and verify CIFAR-100 before a sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adacov.data.cifar100 import FOLDER, load_cifar100
from adacov.cli import exit_on_run_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download, verify and extract CIFAR-100.")
    parser.add_argument("--root", default="data")
    parser.add_argument("--no-download", action="store_true")
    args = parser.parse_args(argv)
    with exit_on_run_error():
        data = load_cifar100(args.root, download=not args.no_download)
    print(f"CIFAR-100 ready in {Path(args.root).resolve() / FOLDER}: {len(data.train_y)} train, {len(data.test_y)} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
