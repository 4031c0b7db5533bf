"""Paper tables as code: declared runs (experiments/), launching, rendering, plots, sweeps."""

from kron.tables.results import RunResult, collect, collect_wandb
from kron.tables.spec import PAPER_HEADLINE, Row, Table, list_tables, load_table

__all__ = ["PAPER_HEADLINE", "Row", "RunResult", "Table", "collect", "collect_wandb",
           "list_tables", "load_table"]
