"""How large KLD-WRM's wake and Q's extra terms grow while it trains the digits demo (docs/kfac.md).

    OMP_NUM_THREADS=1 python benchmarks/kld_wrm_terms.py --kernel-size 3 --lr 0.003 --seeds 0 1 2 [--override ...] [--out F]

Trains ``experiment=tune``'s runs (the demo's data, widths, 15 epochs) of KLD-WRM SO and Q, and SO at the lr
times ``1 + --nudge``, in float32 as the sweep does, recording in every layer and step:

- ``wake``: ``||g_hat - g|| / ||g||``, how much of the step's gradient the wake replaces;
- ``curv``: Q's curvature term against the previous gradient, ``||G S_{k-1} A|| / ||g_{k-1}||``;
- ``aug``: Q's augmentation against the average, ``||alpha_k X_k||_F / ||X_hat||_F`` for ``X = A, G``;
- ``eig``: the augmented factors' ``min eig / max eig`` (float64 ``eigvalsh``): negative would mean not PSD;
- ``nu``: the KL clipping's factor (1: unclipped).

Prints (and with ``--out`` writes) a Markdown table per run: each epoch's train loss with the medians and extremes
of these over its steps, then every run's final and highest epoch loss.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch
from bench_report import machine_description, publish
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import adacov.optim.kfac as kfac_module
from adacov.config import register_resolvers
from adacov.optim.kfac import KFAC
from adacov.optim.kld_wrm import BATCH_IN, BATCH_OUT, KLDWRM, PREVIOUS_GRAD, PREVIOUS_STEP
from adacov.training import train

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RECORD: dict[str, list[float]] = defaultdict(list)  # the current step's values, by quantity


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    """``||numerator|| / ||denominator||`` (Frobenius), in float64."""
    return float(numerator.double().norm() / denominator.double().norm())


def record_layer_gradient(original):
    """Wraps ``KLDWRM._layer_gradient``: records ``wake`` and, for Q, ``curv``."""

    def wrapped(self, group, state, grad):
        if PREVIOUS_GRAD in state and group["form"] == "q":
            curvature = state[BATCH_OUT] @ state[PREVIOUS_STEP] @ state[BATCH_IN]
            RECORD["curv"].append(ratio(curvature, state[PREVIOUS_GRAD]))
        modified = original(self, group, state, grad)
        RECORD["wake"].append(ratio(modified - grad, grad))
        return modified

    return wrapped


def record_inversions(original):
    """Wraps ``KLDWRM._inversions``: records Q's ``aug`` and the augmented factors' ``eig``."""

    def wrapped(self, group, state):
        if group["form"] == "q":
            averages = KFAC._factors(self, group, state)
            for average, augmented in zip(averages, self._factors(group, state)):
                RECORD["aug"].append(ratio(augmented - average, average))
                eigenvalues = torch.linalg.eigvalsh(augmented.double())
                RECORD["eig"].append(float(eigenvalues[0] / eigenvalues[-1]))
        return original(self, group, state)

    return wrapped


def record_kl_clip(original):
    """Wraps ``kl_clipped``: records ``nu``, the clipped direction's norm over the direction's."""

    def wrapped(layers, directions):
        clipped = original(layers, directions)
        if directions:
            RECORD["nu"].append(ratio(clipped[0], directions[0]))
        return clipped

    return wrapped


def record_steps() -> list[dict[str, float]]:
    """Installs the recorders; returns the list that each step's summary is appended to."""
    steps: list[dict[str, float]] = []
    step = KLDWRM.step

    def recorded_step(self, closure=None):
        RECORD.clear()
        loss = step(self, closure)
        steps.append({key: values for key, values in RECORD.items()})
        return loss

    KLDWRM.step = recorded_step
    KLDWRM._layer_gradient = record_layer_gradient(KLDWRM._layer_gradient)
    KLDWRM._inversions = record_inversions(KLDWRM._inversions)
    kfac_module.kl_clipped = record_kl_clip(kfac_module.kl_clipped)
    return steps


def run(optimizer: str, kernel_size: int, lr: float, seed: int, extra: list[str], out: Path) -> pd.DataFrame:
    """Trains one run of ``experiment=tune`` (with the ``extra`` overrides) into ``out``; returns its ``epochs.csv``."""
    overrides = [
        "experiment=tune", f"optimizer={optimizer}", f"model.kernel_size={kernel_size}", f"optimizer.lr={lr}",
        f"seed={seed}", "wandb.mode=disabled", *extra,
    ]  # fmt: skip
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        del cfg.hydra
    train(cfg)
    return pd.read_csv(out / "epochs.csv")


def summarize(epochs: pd.DataFrame, steps: list[dict[str, list[float]]]) -> pd.DataFrame:
    """Per epoch: train loss, and the median / extreme of every recorded quantity over the epoch's steps."""
    rows, first = [], 0
    for _, row in epochs.iterrows():
        window, first = steps[first : int(row.step)], int(row.step)
        values = defaultdict(list)
        for step in window:
            for key, numbers in step.items():
                values[key].extend(numbers)
        summary = {"epoch": int(row.epoch), "train loss": row.train_loss}
        for key, numbers in values.items():
            series = pd.Series(numbers)
            lowest = key in ("eig", "nu")  # the worrying end: a negative eigenvalue, a tight clip
            summary[f"{key} median"] = series.median()
            summary[f"{key} {'min' if lowest else 'max'}"] = series.min() if lowest else series.max()
        rows.append(summary)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--nudge", type=float, default=1e-3, help="SO is also run at lr * (1 + nudge)")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides, e.g. optimizer.momentum=0")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    register_resolvers()
    steps = record_steps()
    runs = [("kld_wrm_so", args.lr), ("kld_wrm_so", args.lr * (1 + args.nudge)), ("kld_wrm_q", args.lr)]
    sections, finals = [], []
    for seed in args.seeds:
        for optimizer, lr in runs:
            steps.clear()
            with tempfile.TemporaryDirectory() as out:
                epochs = run(optimizer, args.kernel_size, lr, seed, args.override, Path(out))
            title = f"### {optimizer}, {args.kernel_size}x{args.kernel_size}, lr {lr:.6g}, seed {seed} {' '.join(args.override)}"
            sections.append(f"{title}\n\n{summarize(epochs, steps).to_markdown(index=False, floatfmt='.3g')}")
            losses = epochs.train_loss
            finals.append({"optimizer": optimizer, "lr": lr, "seed": seed, "final": losses.iloc[-1], "highest": losses.max()})
    sections.append(f"### Final and highest epoch train loss\n\n{pd.DataFrame(finals).to_markdown(index=False, floatfmt='.4g')}")
    sections.insert(0, f"Machine: {machine_description(torch.device('cpu'))}")
    publish("\n\n".join(sections), args.out, "KLD-WRM: the wake's and Q's terms during training", "kld_wrm_terms.py", None)


if __name__ == "__main__":
    main()
