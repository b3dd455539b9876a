"""Table 1: training-time increase of each optimizer over Adam, per kernel size."""

from __future__ import annotations

import pandas as pd

from adacov.report.figure import NAMES, _ordered
from adacov.report.runs import Run

PAPER_INCREASE = {3: "+28 %", 5: "+169 %"}  # AdaCov over Adam, paper's Table 1 (GTX 1080Ti)
WARMUP_STEPS = 10

NOTES = f"""\
How it was measured: the step time is one training step - zero_grad, forward, backward and the
optimizer step on one batch already on the device - timed with CUDA events on a GPU (no host sync
inside the loop; the events are read every `log_every` steps) and with `time.perf_counter` on a CPU.
The first {WARMUP_STEPS} steps of each run are warm-up and excluded; a run's step time is the mean
over its remaining steps, so that work done every few steps (fast AdaCov's refreshes, the K-FAC
family's inverses, Shampoo's roots) counts at its amortized cost, and a table cell the median over
runs. The increase over Adam is computed per seed against the Adam run with the same seed and kernel
size, and given as mean ± std over seeds. Epoch time is the wall time of an epoch's training loop
(batch sampling and augmentation on the device included, test evaluation excluded), median over
epochs after the first and over runs. Peak memory is CUDA's peak allocation per epoch on a GPU and
the process's peak resident memory on a CPU. The paper's numbers were measured on a GTX 1080Ti with
an i9-7900X (section 3)."""


def run_step_time(run: Run) -> float:
    """Mean step time after the warm-up: the amortized cost, periodic work included (a median would hide it)."""
    steps = run.metrics
    timed = steps[steps.step > WARMUP_STEPS] if len(steps) > WARMUP_STEPS else steps
    return float(timed.step_time_s.mean())


def run_epoch_time(run: Run) -> float:
    if run.epochs.empty or "epoch_time_s" not in run.epochs:
        return float("nan")
    times = run.epochs.epoch_time_s
    return float((times.iloc[1:] if len(times) > 1 else times).median())


def build_table(runs: list[Run]) -> pd.DataFrame:
    """One row per (kernel size, optimizer), Adam first; times in ms and s, memory in MB."""
    per_run = pd.DataFrame(
        {
            "kernel": f"{r.kernel_size}x{r.kernel_size}",
            "k": r.kernel_size,
            "optimizer": r.optimizer,
            "seed": r.info.get("seed"),
            "step_ms": 1e3 * run_step_time(r),
            "epoch_s": run_epoch_time(r),
            "peak_mem_mb": r.epochs.peak_mem_mb.max() if "peak_mem_mb" in r.epochs else float("nan"),
            "state_mb": r.epochs.optimizer_state_mb.iloc[-1] if "optimizer_state_mb" in r.epochs and not r.epochs.empty else float("nan"),
            "device": r.info.get("device_name", "?"),
        }
        for r in runs
    )
    adam = per_run[per_run.optimizer == "adam"].set_index(["k", "seed"]).step_ms
    rows = []
    for k in sorted(per_run.k.unique()):
        for name in _ordered(per_run[per_run.k == k].optimizer.unique()):
            group = per_run[(per_run.k == k) & (per_run.optimizer == name)]
            increase = pd.Series(
                [100 * (ms / adam[(k, s)] - 1) for s, ms in zip(group.seed, group.step_ms) if (k, s) in adam.index], dtype=float
            )
            rows.append(
                {
                    "kernel": f"{k}x{k}",
                    "optimizer": NAMES.get(name, name),
                    "runs": len(group),
                    "step time (ms)": group.step_ms.median(),
                    "epoch time (s)": group.epoch_s.median(),
                    "increase over Adam (%)": increase.mean() if len(increase) else float("nan"),
                    "spread (std, %)": increase.std() if len(increase) > 1 else float("nan"),
                    "peak memory (MB)": group.peak_mem_mb.median(),
                    "optimizer state (MB)": group.state_mb.median(),
                    "device": ", ".join(sorted(group.device.unique())),
                    "paper": PAPER_INCREASE.get(k, "") if name == "adacov" else "",
                }
            )
    return pd.DataFrame(rows)


def table_markdown(table: pd.DataFrame, header: str) -> str:
    body = table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".1f", missingval="-")
    return f"# Table 1: training-time increase over Adam\n\n{header}\n\n{body}\n\n{NOTES}\n"
