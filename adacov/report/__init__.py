"""Figure 1 and Table 1 from the files that train.py writes."""

from adacov.report.figure import moving_average, plot_figure
from adacov.report.runs import Run, load_runs
from adacov.report.table import build_table, table_markdown

__all__ = ["Run", "build_table", "load_runs", "moving_average", "plot_figure", "table_markdown"]
