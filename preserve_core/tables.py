"""Console tables that read at 80 columns: short labels, light borders, cells folded (never cut with '…').

A table built here may have more columns when the console is wide (``is_wide``); the narrow form
keeps what a reader needs at a glance, and the Markdown reports keep every detail.
"""

from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table

WIDE_AT = 120  # console columns from which the detailed form is shown


def is_wide(width: int | None) -> bool:
    return width is not None and width >= WIDE_AT


class PlainTable(Table):
    """A rich table whose string title, caption and cells are literal text, not console markup: a method
    label, task name or path with ``[...]`` in it shows as written (markup would drop ``[tag]`` and
    raise on ``[/...]``). Styles are given as arguments (``add_row(..., style="red")``)."""

    def __init__(self, *args, title=None, caption=None, **kwargs):
        super().__init__(*args, title=plain(title), caption=plain(caption), **kwargs)

    def add_row(self, *cells, **kwargs) -> None:
        super().add_row(*(plain(c) for c in cells), **kwargs)


def plain(value):
    """``value`` with console markup escaped when it is a string (None and renderables pass through)."""
    return escape(value) if isinstance(value, str) else value


def make_table(title: str | None, headers: list[str], width: int | None, caption: str | None = None, left: int = 1) -> Table:
    """A rich table: the first ``left`` columns left-aligned, the rest right-aligned; every cell folds."""
    table = PlainTable(
        title=title, caption=caption, box=box.HEAVY_HEAD if is_wide(width) else box.SIMPLE_HEAD,
        caption_justify="left", title_justify="left",
    )  # fmt: skip
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left else "right", overflow="fold")
    return table
