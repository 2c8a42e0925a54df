"""Layout helpers the figures share: rows of labelled bars that stay readable at any count, notes
for rows without data, units chosen by magnitude, and the one boxplot call every supported
matplotlib takes.

Figures use matplotlib's constrained layout, which makes room for tick labels, titles and
legends placed outside the axes; their height grows with the number of rows.
"""
from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt  # headless: matplotlib picks Agg; notebooks: the inline backend
import matplotlib.transforms as mtransforms
from packaging.version import Version

ROW_IN = 0.26  # inches per bar row: 8-point tick labels one above the other with room between
TICK_FONT = 8
NOTE_GID = "status-note"  # the gid of a row's note (fit_notes shortens these to their axes)
MPL = Version(matplotlib.__version__)


def panel_height(rows: int) -> float:
    """Inches for a panel of `rows` bar rows (title and x axis included)."""
    return 1.1 + ROW_IN * max(rows, 2)


def label_width(labels) -> float:
    """Inches an 8-point tick label of the longest of `labels` takes (a generous estimate)."""
    return 0.065 * max((len(str(s)) for s in labels), default=0)


def new_figure(rows_per_panel: list[int], ncols: int, width: float, extra_height: float = 0.9, **kw):
    """A figure of len(rows_per_panel) panel rows (sharing y within a row) and ncols columns,
    each row as tall as its bars need."""
    heights = [panel_height(n) for n in rows_per_panel]
    fig, grid = plt.subplots(len(heights), ncols, figsize=(width, sum(heights) + extra_height), squeeze=False,
                             sharey="row", layout="constrained", height_ratios=heights, **kw)
    return fig, grid


def bar_rows(ax, rows: list[str], notes: dict[str, str] | None = None) -> None:
    """Rows 0..n-1 labelled `rows`, top to bottom; a row named in `notes` gets its note (why it
    has no bar: 'skipped: needs CUDA') written across the plot, in grey."""
    ax.set_yticks(range(len(rows)), rows, fontsize=TICK_FONT)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.tick_params(axis="x", labelsize=TICK_FONT)
    along_rows = mtransforms.blended_transform_factory(ax.transAxes, ax.transData)
    for label, note in (notes or {}).items():
        text = ax.text(0.01, rows.index(label), " ".join(str(note).split()), transform=along_rows, va="center",
                       fontsize=7, color="#6f6f6f", style="italic", gid=NOTE_GID)
        text.set_in_layout(False)  # the layout is made for the bars; fit_notes makes the note fit


def fit_notes(fig) -> None:
    """Shorten each row note (bar_rows) that runs past its axes' right edge, ending it in '…'.
    The figure is laid out first, so the notes fit the axes as they are drawn."""
    notes = [t for ax in fig.axes for t in ax.texts if t.get_gid() == NOTE_GID]
    if not notes:
        return
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for text in notes:
        right = text.axes.get_window_extent(renderer).x1 - 4
        full = text.get_text()
        keep = len(full)
        while keep > 8:
            box = text.get_window_extent(renderer)
            if box.x1 <= right:
                break
            keep = min(keep - 1, int(keep * (right - box.x0) / box.width))
            text.set_text(full[:keep].rstrip() + "…")


def legend_outside(ax, **kw):
    """The axes' legend to the right of it (constrained layout makes room); none where nothing
    drawn has a label (every value missing), which matplotlib would warn of."""
    if "handles" not in kw and not ax.get_legend_handles_labels()[0]:
        return None
    return ax.legend(fontsize=TICK_FONT, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kw)


def mib_unit(largest_mib: float) -> tuple[float, str]:
    """(factor, unit) that shows MiB values of this size as numbers between 1 and 1024."""
    if largest_mib >= 1024:
        return 1 / 1024, "GiB"
    if largest_mib >= 1 or largest_mib <= 0:
        return 1.0, "MiB"
    return 1024.0, "KiB"


def boxplot_horizontal(ax, data: list, labels: list[str]):
    """Horizontal boxes with these tick labels: matplotlib 3.10 named the orientation (`vert` is
    deprecated there), 3.9 renamed `labels` to `tick_labels`."""
    if MPL >= Version("3.10"):
        return ax.boxplot(data, orientation="horizontal", tick_labels=labels)
    if MPL >= Version("3.9"):
        return ax.boxplot(data, vert=False, tick_labels=labels)
    return ax.boxplot(data, vert=False, labels=labels)
