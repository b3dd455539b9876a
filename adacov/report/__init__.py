"""Figure 1, Table 1 and the final-loss table from the files that train.py writes."""

from adacov.report.comparison import build_comparison, comparison_markdown
from adacov.report.figure import accuracy_curve, moving_average, plot_figure
from adacov.report.final_losses import build_final_losses, final_losses_markdown
from adacov.report.runs import Run, load_runs
from adacov.report.table import build_table, table_markdown

__all__ = [
    "Run",
    "accuracy_curve",
    "build_comparison",
    "build_final_losses",
    "comparison_markdown",
    "build_table",
    "final_losses_markdown",
    "load_runs",
    "moving_average",
    "plot_figure",
    "table_markdown",
]
