"""Fashion-MNIST from its official idx files: a local copy, Debian's package, or the official download."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from adacov.data.download import fetch, md5_hex
from adacov.data.image_data import ImageData
from adacov.errors import DataError

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FOLDER = "fashion-mnist"  # below data.root
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs the archives
SIDE = 28  # the images' side in the files
PADDED = 32  # the side the loader returns: the paper's net pools three times, and 28 is not divisible by 8
CLASSES = 10
GZIP_MAGIC = b"\x1f\x8b"
GET_IT = "run make data DATA=fashion_mnist (as root it installs Debian's dataset-fashion-mnist), or set data.download=true"


@dataclass(frozen=True)
class IdxSpec:
    """One official file: its name without ``.gz``, the md5 of its decompressed content, its item shape."""

    name: str
    md5: str
    item_shape: tuple[int, ...]

    @property
    def magic(self) -> int:
        """idx magic number: two zero bytes, type 0x08 (unsigned byte), the number of dimensions."""
        return 0x0800 + 1 + len(self.item_shape)


TRAIN_IMAGES = IdxSpec("train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a", (SIDE, SIDE))
TRAIN_LABELS = IdxSpec("train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9", ())
TEST_IMAGES = IdxSpec("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a", (SIDE, SIDE))
TEST_LABELS = IdxSpec("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965", ())
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


class IdxProblem(Exception):
    """What is wrong with an idx file, worded to follow its name ("is truncated ...")."""


def load_fashion_mnist(
    root: str | Path = "data",
    download: bool = False,
    augment: bool = True,
    crop_padding: int = 2,
    flip: bool = True,
    system_dir: str | Path = SYSTEM_DIR,
    url: str = URL,
    md5s: Mapping[str, str] | None = None,
) -> ImageData:
    """The 60,000 / 10,000 Fashion-MNIST images as ``[N, 1, 32, 32]`` uint8 (zero-padded from 28) with labels.

    Each of the four files is taken from ``root/fashion-mnist/``, else from ``system_dir``, as ``NAME.gz``
    or raw ``NAME``; else (if ``download``) fetched from ``url`` into ``root/fashion-mnist/NAME.gz`` and kept
    only if it passes the checks. The checks: the idx header (magic number, item shape, a payload as long
    as the header says), the md5 of the decompressed content (``md5s`` overrides the official ones by
    name), equal image and label counts, labels in 0-9.
    """
    md5s = {spec.name: spec.md5 for spec in FILES} | dict(md5s or {})
    folder, system_dir = Path(root) / FOLDER, Path(system_dir)
    x_train, y_train, x_test, y_test = (
        _load(IdxSpec(spec.name, md5s[spec.name], spec.item_shape), folder, system_dir, download, url) for spec in FILES
    )
    for images, labels, (image_spec, label_spec) in (
        (x_train, y_train, (TRAIN_IMAGES, TRAIN_LABELS)),
        (x_test, y_test, (TEST_IMAGES, TEST_LABELS)),
    ):
        if len(images) != len(labels):
            raise DataError(
                f"{image_spec.name} holds {len(images)} images but {label_spec.name} {len(labels)} labels: "
                f"they are not one split of Fashion-MNIST; replace them with the official files ({GET_IT})"
            )
        if labels.max(initial=0) >= CLASSES:
            bad = int(np.argmax(labels >= CLASSES))
            raise DataError(
                f"{label_spec.name} holds label {labels[bad]} at item {bad}: Fashion-MNIST's labels are 0-9; "
                f"replace it with the official file ({GET_IT})"
            )
    return ImageData(
        name="fashion_mnist",
        train_x=_padded(x_train),
        train_y=torch.from_numpy(y_train.astype(np.int64)),
        test_x=_padded(x_test),
        test_y=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=CLASSES,
        augment=augment,
        crop_padding=crop_padding,
        flip=flip,
    )


def _load(spec: IdxSpec, folder: Path, system_dir: Path, download: bool, url: str) -> np.ndarray:
    """The items of one file, from the first place that has it, or downloaded; a bad file is an error."""
    found = next((p for d in (folder, system_dir) for p in (d / f"{spec.name}.gz", d / spec.name) if p.is_file()), None)
    if found is None:
        if not download:
            raise DataError(f"Fashion-MNIST's {spec.name}[.gz] is in neither {folder.resolve()}/ nor {system_dir}/: {GET_IT}")
        found = folder / f"{spec.name}.gz"
        fetch(url + found.name, found, lambda path: _problem(path, spec), f"as root run apt-get install dataset-fashion-mnist, or put the official files in {folder.resolve()}/")
    try:
        return read_idx(found, spec)
    except IdxProblem as problem:
        advice = (
            "reinstall Debian's dataset-fashion-mnist (apt-get install --reinstall dataset-fashion-mnist)"
            if found.parent == system_dir
            else f"delete it and {GET_IT}"
        )
        raise DataError(f"{found} {problem}; {advice}") from None


def _problem(path: Path, spec: IdxSpec) -> str | None:
    try:
        read_idx(path, spec)
    except IdxProblem as problem:
        return str(problem)
    return None


def read_idx(path: Path, spec: IdxSpec) -> np.ndarray:
    """The items of an idx file of unsigned bytes, raw or gzip, ``[N, *spec.item_shape]``.

    An idx file is a big-endian header - magic ``0x0000 08 D`` for D dimensions, then D 32-bit sizes -
    followed by the items' bytes; gzip is told by its own magic bytes, ``1f 8b``, so a file's name does
    not matter. Raises :class:`IdxProblem` for a file that is not ``spec``.
    """
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC or path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise IdxProblem(f"is truncated or not gzip ({error})") from None
    dims = len(spec.item_shape) + 1
    header = 4 * (1 + dims)
    if len(raw) < header:
        raise IdxProblem(f"is truncated: {len(raw)} bytes, shorter than an idx header of {header}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != spec.magic:
        raise IdxProblem(f"has magic number 0x{magic:08x}, expected 0x{spec.magic:08x} (unsigned bytes, {dims} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if shape[1:] != spec.item_shape:
        raise IdxProblem(f"holds items of shape {shape[1:]}, expected {spec.item_shape}")
    payload = int(np.prod(shape))
    if len(raw) - header < payload:
        raise IdxProblem(f"is truncated: {len(raw) - header} bytes after its header, which announces {payload} {shape}")
    if len(raw) - header > payload:
        raise IdxProblem(f"holds {len(raw) - header} bytes after its header, which announces only {payload} {shape}")
    found = md5_hex(raw)
    if found != spec.md5:
        raise IdxProblem(f"is corrupt: md5 of its content {found}, expected {spec.md5}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _padded(images: np.ndarray) -> torch.Tensor:
    """``[N, 28, 28]`` -> ``[N, 1, 32, 32]`` uint8, with a border of zeros (the images' background is 0)."""
    border = (PADDED - SIDE) // 2
    return F.pad(torch.from_numpy(images.copy()).unsqueeze(1), (border,) * 4)
