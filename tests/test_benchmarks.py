"""The benchmark scripts run end to end on tiny settings, and the packed layout they time is correct."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch

from adacov.optim.adacov import update_covariance
from adacov.optim.matrix_functions import blend_offdiagonal
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from covariance_storage import PackedCovariance  # noqa: E402


def test_packed_covariance_matches_the_full_blocks():
    torch.manual_seed(0)
    g = torch.randn(6, 9, dtype=torch.float64)
    C = torch.randn(6, 9, 9, dtype=torch.float64)
    C = C @ C.mT
    packed = PackedCovariance.pack(C)
    update_covariance(C, g, 0.9)
    packed.update(g, 0.9)
    rows, cols = torch.triu_indices(9, 9)
    torch.testing.assert_close(packed.values, C[:, rows, cols], rtol=1e-12, atol=1e-14)  # lerp_ vs mul_ + addcmul_ rounding
    blended = blend_offdiagonal(C, 0.3, out=torch.empty_like(C))
    written = packed.eigh_input(0.3, out=torch.full_like(C, float("nan")))
    torch.testing.assert_close(written.tril(), blended.tril(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.linalg.eigh(written).eigenvalues, torch.linalg.eigvalsh(blended))


@pytest.mark.parametrize(
    "script, args, expect",
    [
        ("optimizer_step.py", ["--kernel-sizes", "3", "--rounds", "1", "--warmup", "0", "--batch", "4", "--widths", "4", "4", "4", "4",
                               "4", "4", "--in-channels", "1", "--classes", "10", "--ddp-rounds", "1"], "| 3x3 | adacov | 2 |"),
        ("covariance_storage.py", ["--kernel-sizes", "3", "--rounds", "1", "--batch", "4"], "| 3x3 | fast |"),
        ("profile_step.py", ["--kernel-sizes", "3", "--batch", "4", "--compile"], "| 3x3 | fast, compiled |"),
        ("fast_adacov_direction.py", ["--kernel-sizes", "3", "--epochs", "2", "--steps-per-epoch", "3", "--batch", "4",
                                      "--channels", "4", "4", "4", "4", "4", "4"], "| 3x3 | staggered, T=10, QR refresh (SOAP) |"),
        ("kfac_cost.py", ["--kernel-sizes", "3", "--variants", "tekfac", "--rounds", "1", "--batch", "2"], "| 3x3 | tekfac |"),
        ("ddp_rounding.py", ["--optimizers", "adam", "--kernel-sets", "default"], "| default | adam | float64 |"),
        ("kld_wrm_terms.py", ["--seeds", "0", "--override", "epochs=1"], "### kld_wrm_q, 3x3, lr 0.003, seed 0 epochs=1"),
    ],
)  # fmt: skip
def test_benchmark_writes_its_report_with_command(tmp_path, script, args, expect):
    out = tmp_path / "report.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert f"Command: `python benchmarks/{script} {' '.join(args)} --out {out}`" in text
    assert expect in text


def test_optimizer_step_csv_holds_the_reports_overheads(tmp_path):
    """--csv: one row per (kernel size, optimizer), whose overhead is the report's 'optimizer time over Adam's'."""
    out, csv = tmp_path / "report.md", tmp_path / "steps.csv"
    args = ["--kernel-sizes", "3", "--optimizers", "adam", "adacov", "--rounds", "2", "--warmup", "0", "--batch", "4",
            "--widths", "4", "4", "4", "4", "4", "4", "--in-channels", "1", "--classes", "10", "--ddp-ranks"]  # fmt: skip
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "optimizer_step.py"), *args, "--out", str(out), "--csv", str(csv)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(csv).set_index(["kernel_size", "optimizer"])
    assert list(rows.index) == [(3, "adam"), (3, "adacov")] and rows.loc[(3, "adam"), "overhead_per_adam_step"] == 0.0
    shown = next(line for line in out.read_text().splitlines() if line.startswith("| 3x3 | adacov |")).split("|")[9]
    assert f"{100 * rows.loc[(3, 'adacov'), 'overhead_per_adam_step']:+.1f} %" == shown.strip()


def test_optimizer_step_times_fast_rules_beside_the_default(tmp_path):
    """The refresh rules run under their own settings: with threshold 0 and T = 10, each timed step after the first
    decomposes the next tenth of every tensor's kernels, so 10 steps decompose each kernel once (10.0 % a step)."""
    out = tmp_path / "report.md"
    args = ["--kernel-sizes", "3", "--optimizers", "adam", "adacov_fast", "adacov_fast_t10", "--rounds", "10", "--warmup", "1",
            "--batch", "4", "--widths", "4", "4", "4", "4", "4", "4", "--in-channels", "1", "--classes", "10", "--ddp-ranks"]  # fmt: skip
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "optimizer_step.py"), *args, "--out", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "adacov_fast_t10 = AdaCov(basis_refresh_every=10, basis_refresh_warmup=0, basis_drift_threshold=0.0)" in text
    assert "adacov_fast = AdaCov(basis_refresh_every=50, basis_refresh_warmup=0, basis_drift_threshold=0.0)" in text
    row = next(line for line in text.splitlines() if line.startswith("| 3x3 | adacov_fast_t10 |"))
    assert row.split("|")[11].strip() == "10.0 %"
