"""Console tables that read at 80 columns: short labels, light borders, cells folded (never cut with '…').

A table built here may have more columns when the console is wide (``is_wide``); the narrow form
keeps what a reader needs at a glance, and the Markdown reports keep every detail.
"""

from __future__ import annotations

from rich import box
from rich.table import Table

WIDE_AT = 120  # console columns from which the detailed form is shown


def is_wide(width: int | None) -> bool:
    return width is not None and width >= WIDE_AT


def make_table(title: str | None, headers: list[str], width: int | None, caption: str | None = None, left: int = 1) -> Table:
    """A rich table: the first ``left`` columns left-aligned, the rest right-aligned; every cell folds."""
    table = Table(
        title=title, caption=caption, box=box.HEAVY_HEAD if is_wide(width) else box.SIMPLE_HEAD,
        caption_justify="left", title_justify="left",
    )  # fmt: skip
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left else "right", overflow="fold")
    return table
