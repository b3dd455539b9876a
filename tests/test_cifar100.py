"""The CIFAR-100 loader on small archives built here in the official format."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from adacov.data import load_cifar100
from adacov.data import prepare
from adacov.data.cifar100 import ARCHIVE, FOLDER
from adacov.errors import DataError


def _pickle_bytes(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def make_archive(path, n_train=20, n_test=10, seed=0) -> tuple[str, dict]:
    """A ``cifar-100-python.tar.gz`` laid out as the official one; returns its md5 and contents."""
    rng = np.random.default_rng(seed)
    content = {}
    for split, n in (("train", n_train), ("test", n_test)):
        content[split] = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{split} batch",
            "fine_labels": rng.integers(0, 100, n).tolist(),
            "coarse_labels": rng.integers(0, 20, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
    content["meta"] = {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": [f"super{i}" for i in range(20)]}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in content.items():
            data = _pickle_bytes(obj)
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest(), content


def test_reads_the_official_layout(tmp_path):
    md5, content = make_archive(tmp_path / ARCHIVE)
    data = load_cifar100(tmp_path, download=False, md5=md5)
    assert data.train_x.shape == (20, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (10, 3, 32, 32) and data.num_classes == 100
    # row-major 3072 = 3 x 32 x 32: channel planes of 1024 pixels each
    expected = torch.from_numpy(content["train"]["data"][3].reshape(3, 32, 32))
    assert torch.equal(data.train_x[3], expected)
    assert data.train_y.tolist() == content["train"]["fine_labels"]
    assert (tmp_path / FOLDER / "train").is_file()
    # a second load uses the extracted cache, even once the archive is gone
    (tmp_path / ARCHIVE).unlink()
    assert torch.equal(load_cifar100(tmp_path, download=False, md5=md5).test_x, data.test_x)


def test_download_verifies_then_extracts(tmp_path):
    source = tmp_path / "mirror" / ARCHIVE
    source.parent.mkdir()
    md5, _ = make_archive(source)
    data = load_cifar100(tmp_path / "data", download=True, url=source.as_uri(), md5=md5)
    assert data.train_x.shape[0] == 20 and (tmp_path / "data" / ARCHIVE).is_file()


def test_corrupt_archive_is_rejected_and_nothing_is_cached(tmp_path):
    md5, _ = make_archive(tmp_path / ARCHIVE)
    raw = bytearray((tmp_path / ARCHIVE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / ARCHIVE).write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt"):
        load_cifar100(tmp_path, download=False, md5=md5)
    assert not (tmp_path / FOLDER).exists()


def test_truncated_archive_with_matching_md5_is_not_extracted(tmp_path):
    make_archive(tmp_path / "full.tar.gz")
    raw = (tmp_path / "full.tar.gz").read_bytes()[:200]
    (tmp_path / ARCHIVE).write_bytes(raw)
    with pytest.raises(DataError, match="could not be extracted"):
        load_cifar100(tmp_path, download=False, md5=hashlib.md5(raw).hexdigest())
    assert not (tmp_path / FOLDER).exists()
    assert [p.name for p in tmp_path.iterdir()] == sorted(["full.tar.gz", ARCHIVE]) or len(list(tmp_path.iterdir())) == 2


def test_missing_data_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=f"put {ARCHIVE}.*in {tmp_path}"):
        load_cifar100(tmp_path, download=False)


def test_failed_download_leaves_nothing(tmp_path):
    with pytest.raises(DataError, match="could not download"):
        load_cifar100(tmp_path, download=True, url=(tmp_path / "nowhere.tar.gz").as_uri())
    assert list(tmp_path.iterdir()) == []


def test_prepare_command_reports_ready_data_and_exits_2_on_missing_data(tmp_path, capsys):
    md5, _ = make_archive(tmp_path / ARCHIVE)
    load_cifar100(tmp_path, download=False, md5=md5)  # extracts into the cache that the command finds
    assert prepare.main(["--root", str(tmp_path), "--no-download"]) == 0
    out = capsys.readouterr().out
    assert "CIFAR-100 ready" in out and "20 train, 10 test images" in out
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--root", str(tmp_path / "empty"), "--no-download"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ARCHIVE in err and err.count("\n") == 1
