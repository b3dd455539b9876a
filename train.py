"""Train the paper's 6-conv net with one optimizer: ``python train.py optimizer=adacov ...``.

A thin Hydra entry point over ``adacov.training.train``; user errors end as one line on stderr
with exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from adacov.cli import check_group_choices, divergence_ends_only_this_sweep_job, exit_on_run_error, rank_overrides
from adacov.config import register_resolvers
from adacov.training import train

CONFIG_DIR = Path(__file__).parent / "configs"
register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    with exit_on_run_error(), divergence_ends_only_this_sweep_job():
        return train(cfg)["train_loss"]


if __name__ == "__main__":
    with exit_on_run_error():
        check_group_choices(sys.argv[1:], CONFIG_DIR)
    sys.argv += rank_overrides(os.environ)
    main()
