"""CIFAR-100 from its official archive: download, verify, extract, cache - without torchvision."""

from __future__ import annotations

import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from adacov.data.download import fetch, md5_check
from adacov.data.image_data import ImageData
from adacov.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
MEMBERS = ("meta", "train", "test")


def load_cifar100(
    root: str | Path = "data",
    download: bool = True,
    augment: bool = True,
    url: str = URL,
    md5: str = MD5,
) -> ImageData:
    """The 50,000 / 10,000 CIFAR-100 images ``[N, 3, 32, 32]`` (uint8) with their fine labels.

    Looks for ``root/cifar-100-python/{meta,train,test}``; else extracts ``root/cifar-100-python.tar.gz``
    after checking its md5; else downloads it (if ``download``), keeping it only if its md5 is right. A
    corrupt archive is never extracted.
    """
    root = Path(root)
    folder = root / FOLDER
    if not all((folder / m).is_file() for m in MEMBERS):
        archive = root / ARCHIVE
        put_it_there = f"put {ARCHIVE} (md5 {md5}) in {root.resolve()}/"
        if not archive.is_file():
            if not download:
                raise DataError(f"CIFAR-100 not found: {put_it_there} or set data.download=true")
            fetch(url, archive, md5_check(md5), put_it_there)
        problem = md5_check(md5)(archive)
        if problem is not None:
            raise DataError(f"{archive} {problem}; delete it and download again")
        extract(archive, root)
    return ImageData(
        name="cifar100",
        train_x=_read_images(folder / "train"),
        train_y=_read_labels(folder / "train"),
        test_x=_read_images(folder / "test"),
        test_y=_read_labels(folder / "test"),
        num_classes=len(_unpickle(folder / "meta")["fine_label_names"]),
        augment=augment,
    )


def extract(archive: Path, root: Path) -> None:
    """Extract into a temporary folder and move it into place only when complete."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataError(f"{archive} could not be extracted ({error}); delete it and download again") from error
        extracted = Path(tmp) / FOLDER
        missing = [m for m in MEMBERS if not (extracted / m).is_file()]
        if missing:
            raise DataError(f"{archive} lacks {FOLDER}/{', '.join(missing)}: not the official CIFAR-100 archive")
        shutil.rmtree(root / FOLDER, ignore_errors=True)
        extracted.replace(root / FOLDER)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, OSError) as error:
        raise DataError(f"{path} is unreadable ({error}); delete {path.parent} and extract again") from error


def _read_images(path: Path) -> torch.Tensor:
    data = np.asarray(_unpickle(path)["data"], dtype=np.uint8)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def _read_labels(path: Path) -> torch.Tensor:
    return torch.tensor(_unpickle(path)["fine_labels"], dtype=torch.int64)

