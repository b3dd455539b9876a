"""What every benchmark report carries: the machine it ran on, and the command that made it."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def publish(text: str, out: Path | None, title: str, script: str, argv: list[str] | None) -> None:
    """Print the report; with ``out``, also write it as markdown under ``title`` with the command that made it."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])
        out.write_text(f"# {title}\n\nCommand: `{command}`\n\n{text}\n")
