"""Every configs/optimizer/*.yaml through the training loop: the demo net at 3x3 and 5x5, and an epoch cut by
SIGTERM that resumes to the uninterrupted run's per-step losses, bit for bit."""

from __future__ import annotations

import math
import os
import signal

import pandas as pd
import pytest
import torch

from adacov.errors import TrainingInterrupted, UserError
from adacov.training import train
from adacov.training.checkpoint import CHECKPOINT
from models.conv6 import ConvNet6
from tests.conftest import CONFIG_DIR, SMALL, compose_config

OPTIMIZERS = sorted(p.stem for p in (CONFIG_DIR / "optimizer").glob("*.yaml"))
# The demo's data and widths; batch 256 gives 5 steps an epoch, so step 7 is inside epoch 2.
DEMO = ["experiment=demo", "batch_size=256", "epochs=2", "adacov_warmup_steps=5"]
CUT_AT = 7


@pytest.mark.numerics
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_trains_the_demo_net_and_resumes_a_cut_epoch_bit_for_bit(tmp_path, monkeypatch, optimizer, kernel_size):
    overrides = [*DEMO, f"optimizer={optimizer}", f"model.kernel_size={kernel_size}"]
    last = train(compose_config(tmp_path / "full", overrides))
    assert last["epoch"] == 2 and math.isfinite(last["train_loss"])

    forward, calls = ConvNet6.forward, []

    def signalling(self, x):  # a real SIGTERM to this process during the CUT_AT-th training step
        if self.training:
            calls.append(1)
            if len(calls) == CUT_AT:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, x)

    with monkeypatch.context() as patch:
        patch.setattr(ConvNet6, "forward", signalling)
        with pytest.raises(TrainingInterrupted):
            train(compose_config(tmp_path / "cut", overrides))
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)["position"]["step"] == CUT_AT
    train(compose_config(tmp_path / "cut", [*overrides, "resume=true"]))

    full, cut = (pd.read_csv(tmp_path / run / "metrics.csv")[["step", "epoch", "loss"]] for run in ("full", "cut"))
    assert full.step.tolist() == list(range(1, 11))
    pd.testing.assert_frame_equal(full, cut, check_exact=True)


def test_a_hessian_optimizer_under_ddp_is_refused(small_config, monkeypatch):
    from adacov.training.distributed import Replicas
    from adacov.training.loop import Trainer

    with pytest.raises(UserError, match=r"optimizer=adahessian needs backward\(create_graph=True\), which DDP does not support"):
        Trainer(small_config("optimizer=adahessian"), Replicas(0, 2), torch.device("cpu"))


def test_a_missing_baseline_library_is_a_one_line_error(tmp_path):
    cfg = compose_config(tmp_path, [*SMALL, "optimizer=soap", "optimizer._target_=not_installed_lib.SOAP"])
    with pytest.raises(UserError, match=r"not_installed_lib.SOAP cannot be imported: install the optional baselines"):
        train(cfg)


def test_a_kernel_size_without_a_tuned_lr_asks_for_one(tmp_path):
    cfg = compose_config(tmp_path, [*SMALL, "optimizer=soap", "model.kernel_size=7"])
    with pytest.raises(UserError, match=r"7 is not among 3, 5.*set optimizer.lr"):
        train(cfg)


def test_state_size_counts_tensors_inside_lists_and_helper_objects():
    """SOAP keeps its preconditioners in lists, Shampoo in helper objects: the reported state counts them,
    each tensor once, against a count of the same tensors by hand."""
    from pytorch_optimizer import SOAP, ScalableShampoo

    from adacov.training.loop import optimizer_state_bytes

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    soap = SOAP(conv.parameters(), lr=1e-3, precondition_frequency=1)
    shampoo = ScalableShampoo(conv.parameters(), lr=1e-3, start_preconditioning_step=1, preconditioning_compute_steps=1)
    for optimizer in (soap, shampoo):
        for _ in range(2):
            optimizer.zero_grad()
            conv(torch.randn(2, 3, 5, 5)).square().sum().backward()
            optimizer.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    soap_state = soap.state[conv.weight]
    by_hand = nbytes([soap_state["exp_avg"], soap_state["exp_avg_sq"], *soap_state["GG"], *soap_state["Q"]])
    assert optimizer_state_bytes(soap) == by_hand + nbytes(v for k, v in soap.state[conv.bias].items() if torch.is_tensor(v) and v.dim())
    adam_sized = nbytes([conv.weight, conv.bias])
    assert optimizer_state_bytes(shampoo) > adam_sized
