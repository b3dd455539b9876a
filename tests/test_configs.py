"""Every config group option composes and instantiates."""

from __future__ import annotations

import pytest
import torch

from adacov.training.loop import build_optimizer, instantiate
from tests.conftest import CONFIG_DIR, SMALL_MODEL, compose_config


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("optimizer", _options("optimizer"))
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_optimizer_and_model_instantiate(small_config, optimizer, kernel_size):
    cfg = small_config(f"optimizer={optimizer}", f"model.kernel_size={kernel_size}")
    model = instantiate(cfg.model, in_channels=3, image_size=32, num_classes=100)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert model.features[0].kernel_size == (kernel_size, kernel_size)
    assert isinstance(build_optimizer(cfg.optimizer, model), torch.optim.Optimizer)


@pytest.mark.parametrize("data", [d for d in _options("data") if d not in ("cifar100", "fashion_mnist")])
def test_data_instantiates(tmp_path, data):
    images = instantiate(compose_config(tmp_path, [f"data={data}", *SMALL_MODEL]).data)
    assert images.train_x.dtype == torch.uint8 and images.train_x.dim() == 4
    assert int(images.train_y.max()) < images.num_classes


def test_cifar100_config_points_at_the_data_dir(tmp_path):
    cfg = compose_config(tmp_path, ["data=cifar100"])
    assert cfg.data.root == str(tmp_path / "data") and cfg.data.download is True


def test_fashion_mnist_config_reads_the_data_dir_and_augments_without_cutting_items(tmp_path):
    from tests.test_fashion_mnist import make_files

    md5s, _ = make_files(tmp_path / "data" / "fashion-mnist")
    cfg = compose_config(tmp_path, ["data=fashion_mnist", f"data.system_dir={tmp_path / 'none'}", "data.download=false"])
    data = instantiate(cfg.data, md5s=md5s)
    assert data.train_x.shape == (12, 1, 32, 32) and data.augment and data.flip and data.crop_padding == 2


@pytest.mark.parametrize("optimizer", _options("optimizer"))
def test_experiments_pick_each_optimizers_learning_rate(tmp_path, optimizer):
    """compare: the tuned lr for the kernel size; tune: the trial's grid point; plain runs: the paper's lr
    for Adam and AdaCov, the tuned one for the others."""
    for k in (3, 5):
        compare = compose_config(tmp_path, ["experiment=compare", f"optimizer={optimizer}", f"model.kernel_size={k}"])
        assert compare.optimizer.lr == compare.optimizer.tuned.lr[k]
        plain = compose_config(tmp_path, [f"optimizer={optimizer}", f"model.kernel_size={k}"])
        expected = 1e-3 if optimizer in ("adam", "adacov", "adacov_fast") else plain.optimizer.tuned.lr[k]
        assert plain.optimizer.lr == expected
    tune = compose_config(tmp_path, ["experiment=tune", f"optimizer={optimizer}", "tune_trial=4"])
    assert tune.optimizer.lr == tune.optimizer.tune.lr[4] and len(tune.optimizer.tune.lr) == 5


def test_fashion_mnist_sweeps_place_and_read_their_learning_rates(tmp_path, monkeypatch):
    """The tuning grid: half-decades around the digits-tuned lr; the finals: the lr the sweep's report picked."""
    from omegaconf.errors import InterpolationResolutionError

    tune = compose_config(tmp_path, ["experiment=tune_fashion_mnist", "optimizer=kfac", "model.kernel_size=5", "lr_step=-1"])
    assert tune.optimizer.tuned.lr[5] == 3e-4 and tune.optimizer.lr == 1e-4 and tune.seed == 0
    assert tune.data._target_.endswith("load_fashion_mnist") and tune.adacov_warmup_steps == 468
    monkeypatch.chdir(tmp_path)
    compare = compose_config(tmp_path, ["experiment=compare_fashion_mnist", "optimizer=kfac", "model.kernel_size=5"])
    with pytest.raises(InterpolationResolutionError, match="best_lr.csv does not exist: run the tuning sweep first"):
        _ = compare.optimizer.lr
    table = tmp_path / "results" / "fashion_mnist" / "tune" / "best_lr.csv"
    table.parent.mkdir(parents=True)
    table.write_text("optimizer,k,best_lr,mean_train_loss,mean_test_acc,edge\nkfac,5,0.001,0.3,0.9,False\nkfac,3,0.003,0.3,0.9,False\n")
    assert compare.optimizer.lr == 1e-3
    other = compose_config(tmp_path, ["experiment=compare_fashion_mnist", "optimizer=soap", "model.kernel_size=5"])
    with pytest.raises(InterpolationResolutionError, match="has no tuned lr for soap at 5x5"):
        _ = other.optimizer.lr
