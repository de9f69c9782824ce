"""The transfer-set HTML report: its sections, escaping, counts, truncation and failure placeholders, and a
real headless-Chromium run that checks the images decode and the filters work."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kt_train.report import write_report

from .. import browser as browser_mod
from ..browser import chromium, screenshot

EVIL = "<script>alert(1)</script>"
COLORS = {"cat": (200, 40, 40), "dog": (40, 160, 40), 'sea & "sky"': (40, 60, 200)}


def make_set(
    hits_per_query: Sequence[int], classes: Sequence[str] = tuple(COLORS)
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Queries ``q`` with label ``classes[q % len(classes)]`` and ``hits_per_query[q]`` hits each, scores
    falling with rank; returns (rows, queries)."""
    queries, rows = [], []
    gid = 0
    for q, n in enumerate(hits_per_query):
        label = classes[q % len(classes)]
        queries.append({"query_id": q, "key": f"train/{label}/{q}.png", "label": label})
        for rank in range(n):
            score = round(0.95 - 0.02 * rank - 0.05 * (q % 3), 4)
            rows.append(
                {
                    "id": gid,
                    "source": "shard-000.tar",
                    "key": f"{gid:06d}.jpg",
                    "box": [0, 0, 10 + rank, 12] if rank % 2 else None,
                    "score": score,
                    "query_id": q,
                    "query_label": label,
                    "rank": rank,
                    "method": "query_balanced",
                }
            )
            gid += 1
    return rows, queries


def solid(label: str, shade: int = 0, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    r, g, b = COLORS.get(label, (128, 128, 128))
    return Image.new("RGB", size, (r, g, min(255, b + shade))).convert(mode)


def loaders(rows: Sequence[Mapping[str, Any]], queries: Sequence[Mapping[str, Any]]):
    label_of = {q["query_id"]: q["label"] for q in queries}
    calls: list[int] = []

    def load_hit(row: Mapping[str, Any]) -> Image.Image:
        calls.append(int(row["id"]))
        # varied sizes and modes: wide, tall, grey, with alpha
        size = [(40, 30), (20, 60), (90, 16), (8, 8)][int(row["id"]) % 4]
        mode = ["RGB", "L", "RGBA", "P"][int(row["id"]) % 4]
        return solid(row["query_label"], shade=int(row["rank"]) * 10, size=size, mode=mode)

    def load_query(query_id: int) -> Image.Image:
        return solid(label_of[query_id], size=(64, 48))

    return load_hit, load_query, calls


def write(tmp_path: Path, rows, queries, **kwargs: Any) -> str:
    load_hit, load_query, _ = loaders(rows, queries)
    kwargs.setdefault("load_hit", load_hit)
    kwargs.setdefault("load_query", load_query)
    out = write_report(tmp_path / "report.html", rows, queries=queries, **kwargs)
    assert out == tmp_path / "report.html"
    return out.read_text(encoding="utf-8")


def grid_rows(text: str) -> list[str]:
    """The HTML of each query row, in order."""
    grid = text[text.index('<div id="grid">') :]
    return re.split(r'(?=<div class="query-row")', grid)[1:]


def test_sections_and_self_contained(tmp_path: Path) -> None:
    rows, queries = make_set([3, 2, 4, 1])
    text = write(tmp_path, rows, queries, summary={"method": "query_balanced", "dedup tau": 0.95})
    for needle in (
        'id="summary"',
        'id="class-counts"',
        'id="histograms"',
        'id="grid"',
        'id="class-filter"',
        'id="min-score"',
        'id="shown-count"',
        "<svg",
    ):
        assert needle in text, needle
    assert text.count('class="query-row"') == len(queries)
    assert text.count('class="hit"') == len(rows)
    assert "query_balanced" in text and "dedup tau" in text and "0.95" in text
    # self-contained: no external fetches of any kind
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "http://" not in text and "https://" not in text
    # one histogram overall + one per class
    assert text.count('<svg class="hist"') == 1 + len(COLORS)
    # written atomically: nothing but the report in the directory
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_hits_ordered_by_rank_with_scores(tmp_path: Path) -> None:
    rows, queries = make_set([5])
    text = write(tmp_path, list(reversed(rows)), queries)
    scores = [float(s) for s in re.findall(r'class="hit" data-score="([^"]+)"', text)]
    assert scores == sorted((r["score"] for r in rows), reverse=True)
    assert re.findall(r"<figcaption>([^<]+)</figcaption>", text) == [f"{s:.3f}" for s in scores]


def test_user_text_is_escaped(tmp_path: Path) -> None:
    rows, queries = make_set([2, 1], classes=[EVIL, "ok"])
    for r in rows:
        r["key"] = EVIL
    queries[0]["key"] = f'"><img src=x onerror=alert(1)>{EVIL}'
    text = write(
        tmp_path,
        rows,
        queries,
        title=f"Set {EVIL}",
        summary={EVIL: EVIL, "nested": {"x": EVIL}},
        load_hit=lambda row: solid("cat"),
        load_query=lambda qid: solid("cat"),
    )
    assert EVIL not in text
    assert "<img src=x" not in text
    assert text.count("<script") == 1  # only the report's own
    assert html.escape(EVIL) in text
    assert f'data-class="{html.escape(EVIL)}"' in text
    assert f'<option value="{html.escape(EVIL)}">' in text


def test_class_counts(tmp_path: Path) -> None:
    # classes cycle cat, dog, sea: cat gets queries 0, 3 (4 + 2 hits); dog 1, 4 (0 + 3); sea 2 (1)
    rows, queries = make_set([4, 0, 1, 2, 3])
    text = write(tmp_path, rows, queries)
    table = text[text.index('id="class-counts"') : text.index("</table>", text.index('id="class-counts"'))]
    found = {
        html.unescape(m[0]): (int(m[1]), int(m[2]), float(m[3]))
        for m in re.findall(
            r'<tr data-class="([^"]*)"><td class="class">[^<]*</td><td class="n-queries num">(\d+)</td>'
            r'<td class="n-items num">(\d+)</td><td class="mean-score num">([\d.]+)</td>',
            table,
        )
    }
    expected = {}
    for label in COLORS:
        qids = [q["query_id"] for q in queries if q["label"] == label]
        scores = [r["score"] for r in rows if r["query_id"] in qids]
        expected[label] = (len(qids), len(scores), round(sum(scores) / len(scores), 3))
    assert found == expected
    assert re.search(r'<tr class="total"><td>all</td><td class="num">5</td><td class="num">10</td>', table)
    # a bar per class, the largest at full width
    assert table.count('class="bar"') == len(COLORS)
    assert 'style="width:100.0%"' in table


def test_truncation_embeds_only_max_hits(tmp_path: Path) -> None:
    rows, queries = make_set([30, 5, 0])
    load_hit, load_query, calls = loaders(rows, queries)
    text = write(tmp_path, rows, queries, load_hit=load_hit, load_query=load_query, max_hits_per_query=8)
    first, second, third = grid_rows(text)
    assert first.count('class="hit"') == 8 and "+22 more" in first
    more = re.search(r'class="more" data-scores="([^"]+)"', first)
    assert more is not None and len(more.group(1).split()) == 22
    assert second.count('class="hit"') == 5 and "more" not in second
    assert "no items" in third and 'class="hit"' not in third
    assert len(calls) == 8 + 5  # thumbnails only for what is embedded
    assert text.count("data:image/jpeg;base64,") == 8 + 5 + 3
    # the count of items still covers the truncated ones
    assert re.search(r'<span id="shown-count">35</span> of 35 items', text)


def test_failing_loaders_give_placeholders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows, queries = make_set([4, 3])
    _, good_query, _ = loaders(rows, queries)

    def load_hit(row: Mapping[str, Any]) -> Image.Image:
        if row["rank"] == 1:
            raise OSError(f"cannot read {row['key']}")
        if row["rank"] == 2:
            return None  # type: ignore[return-value]  # a buggy loader
        return solid("cat")

    def load_query(query_id: int) -> Image.Image:
        if query_id == 1:
            raise FileNotFoundError("query image gone")
        return good_query(query_id)

    text = write(tmp_path, rows, queries, load_hit=load_hit, load_query=load_query)
    n_failed = 2 + 2 + 1  # rank 1 and 2 of both queries, query 1
    assert text.count("image unavailable") == n_failed
    assert 'id="load-failures"' in text and f"{n_failed} image(s) could not be loaded" in text
    assert "cannot read" in text
    assert text.count('class="hit"') == len(rows)  # failed hits keep their place (and score)
    assert "could not be loaded" in caplog.text


def test_images_are_thumbnails_and_inputs_untouched(tmp_path: Path) -> None:
    rows, queries = make_set([1])
    big = solid("cat", size=(1000, 800))
    write(tmp_path, rows, queries, load_hit=lambda row: big, load_query=lambda qid: big, thumb_px=50)
    assert big.size == (1000, 800)
    assert (tmp_path / "report.html").stat().st_size < 20_000


def test_bad_arguments(tmp_path: Path) -> None:
    rows, queries = make_set([1])
    with pytest.raises(ValueError, match="thumb_px"):
        write(tmp_path, rows, queries, thumb_px=0)
    with pytest.raises(ValueError, match="max_hits_per_query"):
        write(tmp_path, rows, queries, max_hits_per_query=-1)


def test_empty_transfer_set(tmp_path: Path) -> None:
    _, queries = make_set([0, 0])
    text = write(tmp_path, [], queries)
    assert text.count("no items") == 2
    assert '<span id="shown-count">0</span>' in text


def test_missing_browser_fails_naming_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(browser_mod, "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.fail.Exception, match=r"bash \.ci/setup"):
        browser_mod.require_chromium()


@pytest.mark.timeout(180)
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    browser_mod.require_chromium()  # before importing selenium: a missing install fails naming the fix
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    hits = [6, 3, 0, 9, 2, 30, 1]  # query 2 has no items, query 5 is truncated
    rows, queries = make_set(hits)
    load_hit, load_query, _ = loaders(rows, queries)
    path = write_report(
        tmp_path / "report.html",
        rows,
        load_hit=load_hit,
        load_query=load_query,
        queries=queries,
        summary={"method": "query_balanced"},
        max_hits_per_query=12,
    )

    def visible_items(cls: str | None, min_score: float) -> int:
        labels = {q["query_id"]: q["label"] for q in queries}
        return sum(1 for r in rows if r["score"] >= min_score - 1e-9 and cls in (None, labels[r["query_id"]]))

    with chromium() as driver:
        driver.get(path.as_uri())
        query_rows = driver.find_elements(By.CSS_SELECTOR, "#grid .query-row")
        assert len(query_rows) == len(queries)
        assert all(r.is_displayed() for r in query_rows)

        # every image decodes (naturalWidth > 0), and there is one per embedded thumbnail
        widths = driver.execute_script(
            "return Array.from(document.querySelectorAll('#grid img'))"
            ".map(function (i) { return i.complete ? i.naturalWidth : -1; });"
        )
        assert len(widths) == len(queries) + sum(min(n, 12) for n in hits)
        assert all(w > 0 for w in widths), widths

        shown = driver.find_element(By.ID, "shown-count")
        assert int(shown.text) == len(rows)
        more = driver.find_element(By.CSS_SELECTOR, ".query-row[data-query-id='5'] .more")
        assert more.text == "+18 more"

        # the class filter hides every other class's rows; the label has quotes and an ampersand
        cls = 'sea & "sky"'
        Select(driver.find_element(By.ID, "class-filter")).select_by_value(cls)
        for row in driver.find_elements(By.CSS_SELECTOR, "#grid .query-row"):
            assert row.is_displayed() == (row.get_attribute("data-class") == cls)
        assert int(shown.text) == visible_items(cls, 0.0)
        Select(driver.find_element(By.ID, "class-filter")).select_by_value("")
        assert int(shown.text) == len(rows)

        # moving the slider hides low-score hits and updates the count (truncated items included)
        slider = driver.find_element(By.ID, "min-score")
        slider.click()
        slider.send_keys(Keys.HOME)
        assert int(shown.text) == len(rows)
        for _ in range(40):
            slider.send_keys(Keys.ARROW_RIGHT)
        min_score = float(str(slider.get_attribute("value")))
        assert min_score > float(str(slider.get_attribute("min")))
        assert 0 < int(shown.text) == visible_items(None, min_score) < len(rows)
        for hit in driver.find_elements(By.CSS_SELECTOR, ".hit[data-score]"):
            assert hit.is_displayed() == (float(str(hit.get_attribute("data-score"))) >= min_score)
        assert driver.find_element(By.ID, "min-score-value").text == f"{min_score:.3f}"
        slider.send_keys(Keys.END)
        assert int(shown.text) == visible_items(None, float(str(slider.get_attribute("value"))))

        slider.send_keys(Keys.HOME)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors  # e.g. a script error
        shot = screenshot(driver, tmp_path / "report.png")
        assert shot.stat().st_size > 1000
