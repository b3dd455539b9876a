"""The Fashion-MNIST loader on small idx files made here in the official format, gzip and raw, and on the real files."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adacov.data import load_fashion_mnist
from adacov.data.fashion_mnist import FILES, FOLDER, SYSTEM_DIR, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from adacov.errors import DataError
from tests.conftest import SMALL_MODEL, run_cli

N = {"train": 12, "t10k": 6}


def idx_bytes(items: np.ndarray, magic: int | None = None) -> bytes:
    """An idx file of unsigned bytes: big-endian magic ``0x00000800 + dims``, the sizes, then the items."""
    magic = 0x0800 + items.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in items.shape)
    return header + items.astype(np.uint8).tobytes()


def write(folder: Path, name: str, content: bytes, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{name}.gz" if gz else name)
    path.write_bytes(gzip.compress(content) if gz else content)
    return path


def make_files(folder: Path, gz: bool = True, seed: int = 0, **replace: bytes) -> tuple[dict, dict]:
    """The four files with random content (``replace`` swaps in other content by name); their md5s and items."""
    rng = np.random.default_rng(seed)
    items, md5s = {}, {}
    for spec in FILES:
        n = N[spec.name.split("-")[0]]
        items[spec.name] = rng.integers(0, 256 if spec.item_shape else 10, (n, *spec.item_shape), dtype=np.uint8)
        content = replace.get(spec.name.replace("-", "_"), idx_bytes(items[spec.name]))
        md5s[spec.name] = hashlib.md5(content).hexdigest()
        write(folder, spec.name, content, gz)
    return md5s, items


def load(root: Path, md5s: dict, **kwargs):
    return load_fashion_mnist(root, download=False, system_dir=root / "system", md5s=md5s, **kwargs)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_reads_the_idx_files_and_pads_them_to_32(tmp_path, gz):
    md5s, items = make_files(tmp_path / FOLDER, gz)
    data = load(tmp_path, md5s)
    assert data.train_x.shape == (12, 1, 32, 32) and data.test_x.shape == (6, 1, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.num_classes == 10 and data.name == "fashion_mnist"
    assert torch.equal(data.train_x[:, 0, 2:30, 2:30], torch.from_numpy(items[TRAIN_IMAGES.name]))
    border = data.train_x.clone()
    border[:, :, 2:30, 2:30] = 0
    assert not border.any()
    assert data.train_y.tolist() == items[TRAIN_LABELS.name].tolist()
    assert data.test_y.dtype == torch.int64 and data.test_y.tolist() == items[TEST_LABELS.name].tolist()


def test_data_root_comes_before_the_system_folder(tmp_path):
    system_md5s, _ = make_files(tmp_path / "system", seed=1)
    data = load(tmp_path, system_md5s)  # nothing in root: the system folder's files
    assert data.train_x.shape[0] == 12
    root_md5s, items = make_files(tmp_path / FOLDER, gz=False, seed=2)
    data = load(tmp_path, root_md5s)
    assert torch.equal(data.train_x[:, 0, 2:30, 2:30], torch.from_numpy(items[TRAIN_IMAGES.name]))


def test_download_checks_each_file_before_keeping_it(tmp_path):
    mirror = tmp_path / "mirror"
    md5s, items = make_files(mirror)
    root = tmp_path / "data"
    data = load_fashion_mnist(root, download=True, system_dir=tmp_path / "none", url=mirror.as_uri() + "/", md5s=md5s)
    assert torch.equal(data.test_x[:, 0, 2:30, 2:30], torch.from_numpy(items["t10k-images-idx3-ubyte"]))
    assert sorted(p.name for p in (root / FOLDER).iterdir()) == sorted(f"{s.name}.gz" for s in FILES)


def test_a_bad_download_leaves_nothing_behind(tmp_path):
    mirror = tmp_path / "mirror"
    md5s, _ = make_files(mirror)
    (mirror / f"{TRAIN_IMAGES.name}.gz").write_bytes(b"not gzip at all")
    root = tmp_path / "data"
    with pytest.raises(DataError, match=f"downloaded from .*{TRAIN_IMAGES.name}.gz is truncated.*nothing was kept"):
        load_fashion_mnist(root, download=True, system_dir=tmp_path / "none", url=mirror.as_uri() + "/", md5s=md5s)
    assert [p.name for p in (root / FOLDER).iterdir()] == []  # not even the partial file
    with pytest.raises(DataError, match="could not download"):
        load_fashion_mnist(tmp_path / "other", download=True, system_dir=tmp_path / "none", url=(tmp_path / "void").as_uri() + "/")
    assert list((tmp_path / "other" / FOLDER).iterdir()) == []


def _truncated(name: str, gz: bool):
    def damage(folder: Path) -> None:
        path = folder / (f"{name}.gz" if gz else name)
        path.write_bytes(path.read_bytes()[:-7])

    return damage


def _content(name: str, content: bytes, gz: bool):
    return lambda folder: write(folder, name, content, gz)


BAD_CASES = {
    "missing file": (lambda gz: lambda folder: (folder / (f"{TRAIN_LABELS.name}.gz" if gz else TRAIN_LABELS.name)).unlink(),
                     f"{TRAIN_LABELS.name}\\[.gz\\] is in neither .* run make data DATA=fashion_mnist"),
    "truncated": (lambda gz: _truncated(TRAIN_IMAGES.name, gz), "is truncated"),
    "wrong magic": (lambda gz: _content(TRAIN_IMAGES.name, idx_bytes(np.zeros((12, 28, 28)), magic=0x0801), gz),
                    "has magic number 0x00000801, expected 0x00000803"),
    "wrong item shape": (lambda gz: _content(TRAIN_IMAGES.name, idx_bytes(np.zeros((12, 27, 28))), gz), r"shape \(27, 28\), expected \(28, 28\)"),
    "wrong md5": (lambda gz: _content(TEST_LABELS.name, idx_bytes(np.ones(6)), gz), "is corrupt: md5 of its content"),
}  # fmt: skip


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_a_bad_file_is_one_error_that_names_it_and_what_to_do(tmp_path, case, gz):
    folder = tmp_path / FOLDER
    md5s, _ = make_files(folder, gz)
    make_damage, message = BAD_CASES[case]
    make_damage(gz)(folder)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(DataError, match=message) as error:
        load(tmp_path, md5s)
    text = str(error.value)
    assert "\n" not in text
    assert case == "missing file" or (str(folder) in text and "delete it and run make data DATA=fashion_mnist" in text)
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_images_and_labels_must_pair_up_with_labels_0_to_9(tmp_path, gz):
    short = idx_bytes(np.zeros(11))
    md5s, _ = make_files(tmp_path / FOLDER, gz, train_labels_idx1_ubyte=short)
    with pytest.raises(DataError, match=f"{TRAIN_IMAGES.name} holds 12 images but {TRAIN_LABELS.name} 11 labels"):
        load(tmp_path, md5s)
    labels = np.zeros(6, dtype=np.uint8)
    labels[4] = 10
    md5s, _ = make_files(tmp_path / FOLDER, gz, t10k_labels_idx1_ubyte=idx_bytes(labels))
    with pytest.raises(DataError, match=f"{TEST_LABELS.name} holds label 10 at item 4: Fashion-MNIST's labels are 0-9"):
        load(tmp_path, md5s)


def test_a_bad_system_file_says_to_reinstall_the_package(tmp_path):
    md5s, _ = make_files(tmp_path / "system")
    _truncated(TRAIN_IMAGES.name, True)(tmp_path / "system")
    with pytest.raises(DataError, match="apt-get install --reinstall dataset-fashion-mnist"):
        load(tmp_path, md5s)


def test_augmentation_shifts_by_up_to_2_pixels_and_mirrors(tmp_path):
    md5s, _ = make_files(tmp_path / FOLDER)
    data = load(tmp_path, md5s)
    x, _ = next(data.train_batches(12, torch.Generator().manual_seed(0)))
    originals = data.train_x[torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    padded = F.pad(originals, (2, 2, 2, 2))
    shifts = [padded[..., dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)]
    plain = torch.stack([(x == s).flatten(1).all(1) for s in shifts]).any(0)
    mirrored = torch.stack([(x == s.flip(-1)).flatten(1).all(1) for s in shifts]).any(0)
    assert (plain | mirrored).all() and mirrored.any() and plain.any()


def test_train_py_reports_a_missing_dataset_in_one_line(tmp_path):
    args = ["data=fashion_mnist", "data.download=false", f"data.system_dir={tmp_path / 'none'}", *SMALL_MODEL, "epochs=1"]
    result = run_cli(args, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: Fashion-MNIST's")
    assert "Traceback" not in result.stderr and not (tmp_path / "data").exists()


@pytest.mark.skipif(
    not all((Path(SYSTEM_DIR) / f"{s.name}.gz").is_file() for s in FILES),
    reason=f"the real files are not installed in {SYSTEM_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_the_real_files(tmp_path):
    data = load_fashion_mnist(tmp_path, download=False)
    assert data.train_x.shape == (60_000, 1, 32, 32) and data.test_x.shape == (10_000, 1, 32, 32)
    assert torch.bincount(data.train_y).tolist() == [6000] * 10 and torch.bincount(data.test_y).tolist() == [1000] * 10
    assert not data.train_x[:, :, :2].any() and not data.train_x[..., -2:].any()
