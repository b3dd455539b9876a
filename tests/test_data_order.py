"""Data orders rr / so / ig: the permutations they promise, the same augmentation under each, mid-epoch
resume, DDP slices, and the default (rr) drawing exactly what it always drew."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from adacov.data import ImageData, crop_flip, draw_crop_flip
from adacov.errors import TrainingInterrupted, UserError
from adacov.training import train
from adacov.training.data_order import epoch_generator, fixed_order
from adacov.training.loop import check_settings
from tests.conftest import SMALL, cli_env, compose_config, run_cli

N, BATCH = 40, 8  # 5 batches per epoch


def indexed_data(augment: bool = True, same_image: bool = False) -> ImageData:
    """Images whose label is their index (so a batch's labels are the indices it visits); with ``same_image``
    every image is the same, so a batch's pixels depend only on its crops and flips."""
    shape = (1 if same_image else N, 3, 6, 6)
    images = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = images.expand(N, -1, -1, -1).clone() if same_image else images
    return ImageData("indexed", x, torch.arange(N), x[:4], torch.arange(4), N, augment=augment, crop_padding=2)


def batches(
    data: ImageData, order: str, epoch: int, seed: int = 3, **kwargs
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch ``epoch``'s batches of ``data`` under ``order`` for ``seed``, as the training loop draws them."""
    cpu = torch.device("cpu")
    return list(
        data.train_batches(BATCH, epoch_generator(seed, epoch, cpu), order=fixed_order(order, seed, N, cpu), **kwargs)
    )


def visited(data: ImageData, order: str, epoch: int, seed: int = 3, **kwargs) -> list[torch.Tensor]:
    """The image indices of each batch."""
    return [y for _, y in batches(data, order, epoch, seed, **kwargs)]


def test_rr_draws_a_fresh_permutation_each_epoch_as_before():
    """The default order is the epoch generator's permutation, with the crops drawn after it (the stream the
    committed results came from)."""
    data = indexed_data()
    for epoch in range(2):
        generator = epoch_generator(3, epoch, torch.device("cpu"))
        permutation = torch.randperm(N, generator=generator)
        crops = [draw_crop_flip(BATCH, 2, generator) for _ in range(N // BATCH)]
        drawn = list(data.train_batches(BATCH, epoch_generator(3, epoch, torch.device("cpu"))))
        assert torch.equal(torch.cat([y for _, y in drawn]), permutation)
        for (x, y), (dy, dx, flip) in zip(drawn, crops, strict=True):
            assert torch.equal(x, crop_flip(data.train_x[y], 2, dy, dx, flip))
    assert not torch.equal(torch.cat(visited(data, "rr", 0)), torch.cat(visited(data, "rr", 1)))


def test_so_reuses_epoch_1s_permutation_and_ig_keeps_the_dataset_order():
    data = indexed_data()
    first = torch.cat(visited(data, "rr", 0))
    for epoch in range(3):
        assert torch.equal(torch.cat(visited(data, "so", epoch)), first)
        assert torch.equal(torch.cat(visited(data, "ig", epoch)), torch.arange(N))
    assert not torch.equal(torch.cat(visited(data, "so", 0, seed=4)), first)  # another seed, another permutation


def test_augmentation_is_the_same_under_every_order():
    data = indexed_data(same_image=True)
    pixels = {order: [x for x, _ in batches(data, order, 1)] for order in ("rr", "so", "ig")}
    for batch in range(N // BATCH):
        assert torch.equal(pixels["rr"][batch], pixels["so"][batch]) and torch.equal(
            pixels["rr"][batch], pixels["ig"][batch]
        )


@pytest.mark.parametrize("order", ["rr", "so", "ig"])
def test_each_order_holds_for_a_resumed_epoch_and_across_two_ranks(order):
    data = indexed_data()
    whole = visited(data, order, 1)
    assert [y.tolist() for y in visited(data, order, 1, skip=2)] == [y.tolist() for y in whole[2:]]
    ranks = [visited(data, order, 1, shard=(rank, 2)) for rank in range(2)]
    for i, batch in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][i], ranks[1][i]]), batch)


# 128 8x8 images of 10 classes in batches of 32: 4 steps per epoch, 2 epochs.
TINY = [*SMALL, "data.train_size=128", "data.image_size=8", "data.num_classes=10"]


def interrupted_then_resumed(
    tmp_path: Path, monkeypatch, overrides: list[str], stop_at_batch: int
) -> tuple[Path, Path]:
    """Train ``TINY + overrides`` without a stop, and again with a SIGTERM while the ``stop_at_batch``-th batch
    of epoch 2 trains, then resumed from the checkpoint that stop wrote; return both run directories."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(compose_config(full, [*TINY, *overrides]))
    original, epochs = ImageData.train_batches, []

    def stopping(self, *args, **kwargs):
        epochs.append(None)
        for i, batch in enumerate(original(self, *args, **kwargs), start=1):
            if len(epochs) == 2 and i == stop_at_batch:
                signal.raise_signal(signal.SIGTERM)
            yield batch

    monkeypatch.setattr(ImageData, "train_batches", stopping)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step"):
        train(compose_config(cut, [*TINY, *overrides]))
    monkeypatch.setattr(ImageData, "train_batches", original)
    position = torch.load(cut / "checkpoint.pt", weights_only=False)["position"]
    assert (position["epoch"], position["batch"]) == (1, stop_at_batch)
    train(compose_config(cut, [*TINY, *overrides, "resume=true"]))
    return full, cut


@pytest.fixture(scope="module")
def rr_losses(tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("rr")
    train(compose_config(run_dir, TINY))
    return pd.read_csv(run_dir / "metrics.csv").loss.tolist()


@pytest.mark.numerics
@pytest.mark.parametrize("order", ["so", "ig"])
def test_a_run_resumed_mid_epoch_continues_the_same_order(tmp_path, monkeypatch, rr_losses, order):
    """so trains its first epoch as rr does (the same permutation and crops), then repeats it; ig differs from
    the first step; stopped in epoch 2 and resumed, each logs the uninterrupted run's losses bit for bit."""
    full, resumed = interrupted_then_resumed(tmp_path, monkeypatch, [f"data_order={order}"], stop_at_batch=2)
    columns = ["step", "epoch", "loss"]
    pd.testing.assert_frame_equal(
        pd.read_csv(full / "metrics.csv")[columns], pd.read_csv(resumed / "metrics.csv")[columns]
    )
    losses = pd.read_csv(full / "metrics.csv").loss.tolist()
    if order == "so":
        assert losses[:4] == rr_losses[:4] and losses[4:] != rr_losses[4:]
    else:
        assert losses[0] != rr_losses[0]


@pytest.mark.numerics
def test_two_processes_follow_the_order_salr_and_scaled_lr_of_one_process(tmp_path):
    """so with SALR and sqrt lr scaling, float64: two gloo ranks take the steps one process takes, as the DDP
    tests require of the plain loop (tests/test_distributed.py); SALR's probes average the ranks' gradients,
    so both ranks measure the global batch's sharpness."""
    from tests.test_distributed import torchrun

    args = [*TINY, "device=cpu", "wandb.mode=disabled", "epochs=2", "dtype=float64", "optimizer.lr=0.003", "data_order=so",
            "salr.enabled=true", "lr_scaling=sqrt"]  # fmt: skip
    one = run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(torchrun([*args, f"hydra.run.dir={tmp_path / 'two'}"]), cwd=tmp_path, env=cli_env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr  # includes each epoch's check that both ranks' states are identical
    a, b = pd.read_csv(tmp_path / "one" / "metrics.csv"), pd.read_csv(tmp_path / "two" / "metrics.csv")
    assert a.step.tolist() == b.step.tolist() == list(range(1, 9))
    torch.testing.assert_close(torch.tensor(b.loss.values), torch.tensor(a.loss.values), rtol=1e-12, atol=0)
    sa, sb = pd.read_csv(tmp_path / "one" / "salr.csv"), pd.read_csv(tmp_path / "two" / "salr.csv")
    assert sa.step.tolist() == sb.step.tolist() == [1, 3, 5, 7]
    torch.testing.assert_close(torch.tensor(sb.lr_factor.values), torch.tensor(sa.lr_factor.values), rtol=1e-10, atol=0)


def test_bad_data_order_is_named(small_config):
    with pytest.raises(UserError, match=r"^data_order='foo' is not allowed: use one of rr, so, ig$"):
        check_settings(small_config("data_order=foo"))


def test_bad_data_order_on_the_command_line_is_one_line(tmp_path):
    result = run_cli([*SMALL, "epochs=1", "data_order=shuffled"], cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines == ["error: data_order='shuffled' is not allowed: use one of rr, so, ig"]
