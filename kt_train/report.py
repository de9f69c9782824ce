"""A self-contained HTML report of a curated transfer set, for a person to look at.

One file, no external assets (thumbnails are embedded as base64 JPEG data URIs, CSS and JS inline), so it
opens from ``file://`` offline and can be attached to a job or mailed around. It shows: a summary table,
per-class counts with bars, score histograms (overall and per class, inline SVG), and a grid with one row
per query image beside its top hits. A class dropdown and a minimum-score slider filter the grid in the
browser.

Only ``max_hits_per_query`` thumbnails per query are embedded (the rest are counted as "+N more"), which
keeps the file size proportional to the number of queries, not to the size of the transfer set.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from .io import atomic_write_text

log = logging.getLogger(__name__)

HIST_BINS = 20
_JPEG_QUALITY = 80


@dataclass
class _Query:
    query_id: int
    key: str
    label: str
    hits: list[Mapping[str, Any]] = field(default_factory=list)


def write_report(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    load_hit: Callable[[Mapping[str, Any]], Image.Image],
    load_query: Callable[[int], Image.Image],
    queries: Sequence[Mapping[str, Any]],
    title: str = "Transfer set",
    summary: Mapping[str, Any] | None = None,
    thumb_px: int = 72,
    max_hits_per_query: int = 24,
) -> Path:
    """Write the HTML report of a transfer set to ``path`` (atomically) and return the path.

    ``rows`` is the transfer-set manifest (one mapping per selected item with at least ``query_id`` and
    ``score``; ``id``, ``source``, ``key``, ``box``, ``rank``, ``query_label`` and any extra keys are shown
    when present). ``queries`` lists every labeled query image (``query_id``, ``key``, ``label``), including
    those that got no hits. ``load_hit(row)`` returns the (cropped) image of a selected item and
    ``load_query(query_id)`` the query image; a loader that raises gives a placeholder, not a failed report.
    """
    if thumb_px < 8:
        raise ValueError(f"thumb_px must be at least 8, got {thumb_px}")
    if max_hits_per_query < 0:
        raise ValueError(f"max_hits_per_query must be >= 0, got {max_hits_per_query}")

    by_query = _group(rows, queries)
    scores = [float(r["score"]) for r in rows]
    lo, hi = _score_range(scores)
    thumbs = _Thumbnailer(thumb_px)

    grid = _grid(by_query, thumbs, load_hit, load_query, max_hits_per_query)
    classes = sorted({q.label for q in by_query.values()})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS.replace('THUMB_PX', str(thumb_px))}</style>",
        "</head><body>",
        f"<h1>{_esc(title)}</h1>",
        '<nav><a href="#summary">Summary</a> · <a href="#class-counts">Classes</a> · '
        '<a href="#histograms">Scores</a> · <a href="#grid-section">Grid</a></nav>',
        _summary(summary, rows, by_query, classes),
    ]
    if thumbs.failures:
        parts.append(
            f'<p class="warn" id="load-failures">{thumbs.failures} image(s) could not be loaded and are '
            f"shown as placeholders (first error: {_esc(thumbs.first_error)}).</p>"
        )
    parts += [
        _class_counts(by_query, classes),
        _histograms(by_query, classes, scores, lo, hi),
        _filters(classes, lo, hi, len(rows), len(by_query)),
        grid,
        f"<script>{_JS}</script>",
        "</body></html>",
    ]
    return atomic_write_text(path, "\n".join(parts) + "\n")


# --- data -------------------------------------------------------------------------------------------


def _group(rows: Sequence[Mapping[str, Any]], queries: Sequence[Mapping[str, Any]]) -> dict[int, _Query]:
    """Queries in the given order (then any query only the rows name), each with its hits by rank."""
    by_query: dict[int, _Query] = {}
    for q in queries:
        qid = int(q["query_id"])
        if qid not in by_query:
            by_query[qid] = _Query(qid, str(q.get("key", "")), str(q.get("label", "")))
    for r in rows:
        qid = int(r["query_id"])
        if qid not in by_query:
            by_query[qid] = _Query(qid, "", str(r.get("query_label", "")))
        by_query[qid].hits.append(r)
    for query in by_query.values():
        query.hits.sort(key=lambda r: (r.get("rank", math.inf), -float(r["score"])))
    return by_query


def _score_range(scores: Sequence[float]) -> tuple[float, float]:
    """Histogram / slider range: the scores' range widened to multiples of 0.05 (so bins have round edges)."""
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        return 0.0, 1.0
    lo = math.floor(min(finite) * 20 + 1e-9) / 20
    hi = math.ceil(max(finite) * 20 - 1e-9) / 20
    if hi <= lo:
        hi = lo + 0.05
    return round(lo, 4), round(hi, 4)


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


class _Thumbnailer:
    """Loads images through the caller's loaders and turns them into small JPEG data URIs; a failure
    becomes a placeholder and is counted (and logged once), never raised."""

    def __init__(self, px: int) -> None:
        self.px = px
        self.failures = 0
        self.first_error = ""

    def html(self, load: Callable[[], Image.Image], alt: str) -> str:
        try:
            uri = self._data_uri(load())
        except Exception as e:
            self.failures += 1
            err = f"{type(e).__name__}: {e}"
            if self.failures == 1:
                self.first_error = err
                log.warning("report: an image could not be loaded (%s); showing a placeholder", err)
            return f'<div class="thumb placeholder" title="{_esc(err)}">image unavailable</div>'
        return f'<img class="thumb" src="{uri}" alt="{_esc(alt)}" title="{_esc(alt)}">'

    def _data_uri(self, img: Image.Image) -> str:
        if not isinstance(img, Image.Image):
            raise TypeError(f"the loader returned {type(img).__name__}, not a PIL image")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        else:
            img = img.convert("RGB")  # a copy: thumbnail() below must not shrink the caller's image
        img.thumbnail((self.px, self.px), reducing_gap=2.0)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=_JPEG_QUALITY)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- sections ---------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _num(score: float) -> str:
    """A score as written into data attributes (the slider compares these)."""
    return f"{score:.6g}"


def _summary(
    summary: Mapping[str, Any] | None,
    rows: Sequence[Mapping[str, Any]],
    by_query: Mapping[int, _Query],
    classes: Sequence[str],
) -> str:
    items: list[tuple[str, Any]] = [
        ("selected items", len(rows)),
        ("queries", len(by_query)),
        ("classes", len(classes)),
        ("queries without items", sum(1 for q in by_query.values() if not q.hits)),
    ]
    items += list((summary or {}).items())
    items.append(("report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")))
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in items)
    return f'<section><h2>Summary</h2><table id="summary">{body}</table></section>'


def _class_counts(by_query: Mapping[int, _Query], classes: Sequence[str]) -> str:
    n_queries: dict[str, int] = defaultdict(int)
    scores: dict[str, list[float]] = defaultdict(list)
    for q in by_query.values():
        n_queries[q.label] += 1
        scores[q.label] += [float(r["score"]) for r in q.hits]
    most = max((len(scores[c]) for c in classes), default=0) or 1
    trs = []
    for c in classes:
        n, mean = len(scores[c]), _mean(scores[c])
        trs.append(
            f'<tr data-class="{_esc(c)}"><td class="class">{_esc(c)}</td>'
            f'<td class="n-queries num">{n_queries[c]}</td><td class="n-items num">{n}</td>'
            f'<td class="mean-score num">{"" if mean is None else f"{mean:.3f}"}</td>'
            f'<td class="bar-cell"><div class="bar" style="width:{100 * n / most:.1f}%"></div></td></tr>'
        )
    total = sum(len(s) for s in scores.values())
    mean_all = _mean([s for c in classes for s in scores[c]])
    trs.append(
        f'<tr class="total"><td>all</td><td class="num">{len(by_query)}</td><td class="num">{total}</td>'
        f'<td class="num">{"" if mean_all is None else f"{mean_all:.3f}"}</td><td></td></tr>'
    )
    head = (
        "<tr><th>class</th><th>queries</th><th>selected items</th><th>mean score</th>"
        '<th class="bar-cell">items</th></tr>'
    )
    return (
        f'<section><h2>Per-class counts</h2><table id="class-counts">{head}{"".join(trs)}</table></section>'
    )


def _histogram_svg(scores: Sequence[float], lo: float, hi: float, name: str, width: int, height: int) -> str:
    counts = [0] * HIST_BINS
    step = (hi - lo) / HIST_BINS
    for s in scores:
        if math.isfinite(s):
            counts[min(HIST_BINS - 1, max(0, int((s - lo) / step)))] += 1
    pad_l, pad_b, pad_t = 34, 18, 16
    plot_w, plot_h = width - pad_l - 6, height - pad_b - pad_t
    top = max(counts) or 1
    bar_w = plot_w / HIST_BINS
    bars = []
    for i, n in enumerate(counts):
        h = plot_h * n / top
        x = pad_l + i * bar_w
        bars.append(
            f'<rect x="{x:.1f}" y="{pad_t + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}">'
            f"<title>{lo + i * step:.3f}–{lo + (i + 1) * step:.3f}: {n}</title></rect>"
        )
    base = pad_t + plot_h
    return (
        f'<svg class="hist" data-class="{_esc(name)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="score histogram: {_esc(name)}">'
        f'<text x="{pad_l}" y="11" class="hist-title">{_esc(name)} (n={sum(counts)})</text>'
        f'<line x1="{pad_l}" y1="{base}" x2="{width - 6}" y2="{base}" class="axis"/>'
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{base}" class="axis"/>'
        f'<text x="{pad_l - 3}" y="{pad_t + 8}" text-anchor="end">{top if any(counts) else 0}</text>'
        f'<text x="{pad_l - 3}" y="{base}" text-anchor="end">0</text>'
        f'<text x="{pad_l}" y="{height - 4}" text-anchor="start">{lo:.2f}</text>'
        f'<text x="{pad_l + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">{(lo + hi) / 2:.2f}</text>'
        f'<text x="{width - 6}" y="{height - 4}" text-anchor="end">{hi:.2f}</text>'
        f"{''.join(bars)}</svg>"
    )


def _histograms(
    by_query: Mapping[int, _Query], classes: Sequence[str], scores: Sequence[float], lo: float, hi: float
) -> str:
    per_class: dict[str, list[float]] = defaultdict(list)
    for q in by_query.values():
        per_class[q.label] += [float(r["score"]) for r in q.hits]
    overall = _histogram_svg(scores, lo, hi, "all classes", 520, 180)
    small = "".join(_histogram_svg(per_class[c], lo, hi, c, 260, 120) for c in classes)
    return (
        '<section id="histograms"><h2>Score histograms</h2>'
        f'<div class="hist-overall">{overall}</div><div class="hist-classes">{small}</div></section>'
    )


def _filters(classes: Sequence[str], lo: float, hi: float, total: int, n_queries: int) -> str:
    options = "".join(f'<option value="{_esc(c)}">{_esc(c)}</option>' for c in classes)
    step = (hi - lo) / 100
    return (
        '<section id="grid-section"><h2>Queries and their items</h2><div class="filters">'
        '<label>class <select id="class-filter"><option value="">all classes</option>'
        f"{options}</select></label>"
        f'<label>min score <input type="range" id="min-score" min="{_num(lo)}" max="{_num(hi)}" '
        f'step="{_num(step)}" value="{_num(lo)}"> <output id="min-score-value">{lo:.3f}</output></label>'
        f'<span class="counter"><span id="shown-count">{total}</span> of {total} items shown, '
        f'<span id="shown-queries">{n_queries}</span> queries</span></div>'
    )


def _grid(
    by_query: Mapping[int, _Query],
    thumbs: _Thumbnailer,
    load_hit: Callable[[Mapping[str, Any]], Image.Image],
    load_query: Callable[[int], Image.Image],
    max_hits: int,
) -> str:
    out = ['<div id="grid">']
    for q in by_query.values():
        scores = [float(r["score"]) for r in q.hits]
        mean = _mean(scores)
        qthumb = thumbs.html(partial(load_query, q.query_id), f"query {q.query_id}: {q.key}")
        meta = f'<span class="row-count">{len(q.hits)} items</span>' + (
            "" if mean is None else f", mean {mean:.3f}"
        )
        out.append(
            f'<div class="query-row" data-class="{_esc(q.label)}" data-query-id="{q.query_id}" '
            f'data-total="{len(q.hits)}"><div class="query">{qthumb}'
            f'<div class="label">{_esc(q.label)}</div><div class="key" title="{_esc(q.key)}">{_esc(q.key)}</div>'
            f'<div class="row-meta">{meta}</div></div><div class="hits">'
        )
        if not q.hits:
            out.append('<div class="no-items">no items</div>')
        for r in q.hits[:max_hits]:
            score = float(r["score"])
            out.append(
                f'<figure class="hit" data-score="{_num(score)}">'
                f"{thumbs.html(partial(load_hit, r), _hit_title(r))}"
                f"<figcaption>{score:.3f}</figcaption></figure>"
            )
        rest = scores[max_hits:]
        if rest:
            out.append(
                f'<div class="more" data-scores="{" ".join(_num(s) for s in rest)}">+{len(rest)} more</div>'
            )
        out.append("</div></div>")
    out.append("</div></section>")
    return "".join(out)


def _hit_title(row: Mapping[str, Any]) -> str:
    """Tooltip: every field of the manifest row except those the grid already shows."""
    shown = {"query_id", "query_label"}
    return "\n".join(f"{k}: {_fmt(v)}" for k, v in row.items() if k not in shown)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.2em 2em;color:#222}
[hidden]{display:none!important}
h1{margin:.2em 0}nav{margin-bottom:1em;color:#666}
table{border-collapse:collapse;margin:.4em 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
#summary th{background:#f6f6f6;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:600;background:#f6f6f6}
.bar-cell{width:240px}.bar{height:12px;background:#4a7bd0;min-width:1px}
.warn{color:#8a4b00;background:#fff4e0;padding:.4em .6em;border:1px solid #f0c070}
svg.hist{font-size:10px;margin:0 10px 10px 0;background:#fafafa}
svg.hist rect{fill:#4a7bd0}svg.hist .axis{stroke:#999}.hist-title{font-weight:600}
.filters{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1;
display:flex;gap:1.5em;align-items:center;flex-wrap:wrap}
#min-score{vertical-align:middle;width:220px}
.query-row{display:flex;gap:10px;padding:6px 0;border-bottom:1px solid #eee}
.query{width:THUMB_PXpx;flex:none;font-size:11px}
.query .thumb{outline:3px solid #e0a020}
.query .label{font-weight:600;font-size:12px;overflow-wrap:anywhere}
.key{color:#666;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.hits{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}
figure.hit{margin:0;width:THUMB_PXpx;text-align:center;font-size:11px;font-variant-numeric:tabular-nums}
.thumb{width:THUMB_PXpx;height:THUMB_PXpx;object-fit:contain;background:#eee;display:block}
.placeholder{display:flex;align-items:center;justify-content:center;text-align:center;color:#999;
font-size:10px;border:1px dashed #bbb;box-sizing:border-box}
.more,.no-items{align-self:center;color:#666;padding:0 8px}
"""

_JS = """
(function () {
  var sel = document.getElementById("class-filter");
  var slider = document.getElementById("min-score");
  var sliderValue = document.getElementById("min-score-value");
  var shown = document.getElementById("shown-count");
  var shownQueries = document.getElementById("shown-queries");
  var rows = Array.prototype.slice.call(document.querySelectorAll("#grid .query-row"));
  function apply() {
    var cls = sel.value, min = parseFloat(slider.value), items = 0, queries = 0;
    sliderValue.textContent = min.toFixed(3);
    rows.forEach(function (row) {
      var on = cls === "" || row.getAttribute("data-class") === cls, n = 0;
      row.hidden = !on;
      row.querySelectorAll(".hit").forEach(function (hit) {
        var ok = parseFloat(hit.getAttribute("data-score")) >= min;
        hit.hidden = !ok;
        if (ok) n++;
      });
      var more = row.querySelector(".more");
      if (more) {
        var extra = more.getAttribute("data-scores").split(" ").filter(function (s) {
          return parseFloat(s) >= min;
        }).length;
        more.textContent = "+" + extra + " more";
        more.hidden = extra === 0;
        n += extra;
      }
      var total = parseInt(row.getAttribute("data-total"), 10);
      if (total > 0) {
        row.querySelector(".row-count").textContent = n + " of " + total + " items";
      }
      if (on) { items += n; queries++; }
    });
    shown.textContent = String(items);
    shownQueries.textContent = String(queries);
  }
  sel.addEventListener("change", apply);
  slider.addEventListener("input", apply);
  apply();
})();
"""
