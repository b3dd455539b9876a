"""Invalid hyperparameters raise ValueError naming the value."""

from __future__ import annotations

import re

import pytest
import torch

from adacov import AdaCov

INVALID_ADACOV = [
    ("lr", -1e-3),
    ("betas", (1.0, 0.999)),
    ("betas", (0.9, -0.1)),
    ("eps", 0.0),
    ("cov_eps", -1e-5),
    ("offdiag_warmup", 0),
    ("weight_decay", -0.1),
]


@pytest.mark.parametrize(("name", "value"), INVALID_ADACOV, ids=[f"{n}={v}" for n, v in INVALID_ADACOV])
def test_adacov_rejects(name, value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}: {value}")):
        AdaCov([torch.zeros(2, requires_grad=True)], **{name: value})


def test_adacov_rejects_bad_param_group_override():
    with pytest.raises(ValueError, match="Invalid cov_eps: 0"):
        AdaCov([{"params": [torch.zeros(2, requires_grad=True)], "cov_eps": 0}])


@pytest.mark.parametrize(("name", "value"), [("basis_refresh_every", 0), ("basis_refresh_every", 2.5), ("basis_refresh_warmup", -1)])
def test_adacov_rejects_bad_refresh_settings(name, value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}: {value}")):
        AdaCov([torch.zeros(2, requires_grad=True)], **{name: value})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_are_rejected_when_built(dtype):
    """eigh and Cholesky have no half-precision kernels: say so at construction, not deep in step()."""
    from adacov import MBF, mbf_param_groups

    conv = torch.nn.Conv2d(2, 3, 3).to(dtype)
    with pytest.raises(ValueError, match=re.escape(f"Invalid parameter dtype: {dtype} (AdaCov supports float32 and float64")):
        AdaCov(conv.parameters())
    with pytest.raises(ValueError, match=re.escape(f"Invalid parameter dtype: {dtype} (MBF supports float32 and float64")):
        MBF(mbf_param_groups(conv))
    for supported in (torch.float32, torch.float64):
        AdaCov(conv.to(supported).parameters())
        MBF(mbf_param_groups(conv))
