"""How the ``kt`` commands print the server's JSON for people (``--json`` prints it as it is).

- ``table``: a list of rows that fits the terminal: ids and specs whole (they are copied into the
  next command), other columns folded between words, and when even that does not fit, the least
  useful columns left out (the caption says which).
- ``record``: one object as field / value, nested values as indented ``key: value`` lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

MIN_TEXT = 10
"""The narrowest a folded column gets (a timestamp folds to its date over its time)."""

MAX_WORD = 16
"""A folded column is at least as wide as its longest word up to this many cells, so a name, a
status or a task (``classification``) wraps between words, never inside one."""


def is_id(column: str) -> bool:
    """Columns kept whole, never folded: ids and model specs, which are copied into the next command."""
    return column == "id" or column.endswith("_id") or column == "spec"


def _longest_word(cells: list[str]) -> int:
    return max((cell_len(word) for cell in cells for word in cell.split()), default=0)


def scalar(value: Any) -> str:
    """One value as a short string: ``-`` for null, floats to 4 digits, ISO timestamps to the second."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) < 1e4:
            return f"{value:.4g}"
        return f"{value:.0f}"
    text = str(value)
    if len(text) >= 19 and text[10:11] == "T" and text[4:5] == "-" and text[13:14] == ":":
        return text[:19].replace("T", " ")
    return text


def _is_flat(value: Any) -> bool:
    """A value that fits on one line: a scalar, or a list of scalars."""
    if isinstance(value, dict):
        return not value
    if isinstance(value, list):
        return not any(isinstance(v, dict | list) for v in value)
    return True


def _flat(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(scalar(v) for v in value) if value else "-"
    if isinstance(value, dict):  # empty
        return "-"
    return scalar(value)


def lines(value: Any) -> list[str]:
    """A nested value as ``key: value`` lines, nested objects indented, list items as ``- ...``."""
    if _is_flat(value):
        return [_flat(value)]
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if _is_flat(item):
                out.append(f"{key}: {_flat(item)}")
            else:
                out.append(f"{key}:")
                out.extend("  " + line for line in lines(item))
        return out
    for item in value:  # a list holding objects or lists
        first, *rest = lines(item)
        out.append("- " + first)
        out.extend("  " + line for line in rest)
    return out


def _widths(natural: list[int], minimum: list[int], available: int) -> list[int]:
    """Each column at least its minimum; the space left goes one cell at a time to the columns
    still narrower than their content."""
    widths = list(minimum)
    spare = available - sum(widths)
    while spare > 0:
        growing = [i for i, w in enumerate(widths) if w < natural[i]]
        if not growing:
            break
        for i in growing[:spare]:
            widths[i] += 1
        spare -= min(spare, len(growing))
    return widths


def table(
    console: Console,
    rows: list[dict[str, Any]],
    columns: Sequence[str],
    title: str,
    drop: Sequence[str] = (),
) -> list[str]:
    """Print ``rows`` as a table that fits ``console.width``; returns the columns shown. ``drop``:
    the columns to leave out, first to last, while the others do not fit."""
    cells = {col: [_flat(row.get(col)) for row in rows] for col in columns}
    natural = {col: max([cell_len(col), *(cell_len(c) for c in cells[col])]) for col in columns}
    minimum = {
        col: natural[col]
        if is_id(col)
        else min(natural[col], max(MIN_TEXT, min(MAX_WORD, _longest_word([col, *cells[col]]))))
        for col in columns
    }

    def overhead(n: int) -> int:  # "│ " + " │ " between + " │"
        return 3 * n + 1

    def fits(cols: list[str]) -> bool:
        return sum(minimum[c] for c in cols) + overhead(len(cols)) <= console.width

    shown = list(columns)
    dropped = []
    for col in drop:
        if fits(shown):
            break
        shown.remove(col)
        dropped.append(col)
    for col in reversed(dropped):  # one dropped early may fit beside the rest, now that others left
        with_col = [c for c in columns if c in shown or c == col]
        if fits(with_col):
            shown = with_col
    left_out = [col for col in columns if col not in shown]
    available = console.width - overhead(len(shown))
    fixed = sum(natural[c] for c in shown if is_id(c))
    texts = [c for c in shown if not is_id(c)]
    text_widths = dict(
        zip(
            texts,
            _widths(
                [natural[c] for c in texts],
                # the spare cells go first to the columns still narrower than their longest word
                _widths(
                    [min(natural[c], _longest_word([c, *cells[c]])) for c in texts],
                    [minimum[c] for c in texts],
                    available - fixed,
                ),
                available - fixed,
            ),
            strict=True,
        )
    )

    caption = f"left out at this width: {', '.join(left_out)} (--json has every field)" if left_out else None
    out = Table(title=Text(title), caption=caption)
    for col in shown:
        if is_id(col):
            out.add_column(col, no_wrap=True, width=natural[col])
        else:
            out.add_column(col, overflow="fold", width=text_widths[col])
    for i in range(len(rows)):
        out.add_row(*(Text(cells[col][i]) for col in shown))
    console.print(out)
    return shown


def record(console: Console, obj: dict[str, Any], title: str) -> None:
    """Print one object: its fields in a column, each value as ``lines``."""
    out = Table(title=Text(title), show_header=False)
    out.add_column("field", style="bold", no_wrap=True)
    out.add_column("value", overflow="fold")
    for key, value in obj.items():
        out.add_row(Text(key), Text("\n".join(lines(value))))
    console.print(out)
