"""Transfer-set selection on hand-made vectors, crops, manifests (every format) and the distill reader."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kt_train.curate import (
    crop_boxes,
    global_topn_select,
    near_duplicate_mask,
    read_manifest,
    round_robin_select,
    write_manifest,
)
from kt_train.data import load_unlabeled
from kt_train.errors import ConfigError, DatasetError

from ._images import write_image


def _unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _check_unique(sel) -> None:
    assert len(set(sel.items)) == len(sel.items), "an item was selected twice"


def test_quotas_are_equal_when_every_query_wants_the_same_items() -> None:
    same = np.arange(30)  # all three queries rank the same 30 items identically
    sel = round_robin_select([same, same, same], 15)
    _check_unique(sel)
    assert len(sel) == 15
    assert np.bincount(sel.owners, minlength=3).tolist() == [5, 5, 5]
    # contested items alternate: nobody takes the top three in a row
    assert sel.owners[:3] == [0, 1, 2]


def test_remainder_goes_to_first_queries_and_ranks_count_per_query() -> None:
    ranked = [np.arange(i * 10, i * 10 + 10) for i in range(4)]
    sel = round_robin_select(ranked, 10)
    assert np.bincount(sel.owners, minlength=4).tolist() == [3, 3, 2, 2]
    for q in range(4):
        ranks = [r for r, o in zip(sel.ranks, sel.owners, strict=True) if o == q]
        assert ranks == list(range(len(ranks)))


def test_a_query_whose_items_another_query_also_likes_is_not_starved() -> None:
    # query 1's only candidates are query 0's top items; naive per-query top-k would give them all to 0
    ranked = [np.arange(0, 20), np.array([0, 1, 2, 3])]
    sel = round_robin_select(ranked, 8)
    _check_unique(sel)
    counts = np.bincount(sel.owners, minlength=2).tolist()
    # it got items despite competing for every one of them; the rest of its quota went to query 0
    assert counts == [6, 2], counts


def test_exhausted_queries_leave_their_budget_to_the_others() -> None:
    ranked = [np.array([0]), np.arange(1, 50)]
    sel = round_robin_select(ranked, 10)
    assert len(sel) == 10
    assert np.bincount(sel.owners, minlength=2).tolist() == [1, 9]


def test_without_top_up_an_unfilled_quota_stays_unfilled() -> None:
    # query 0 has one candidate past the floors; with top_up (the default) query 1 takes its place
    ranked = [np.array([0]), np.arange(1, 50)]
    sel = round_robin_select(ranked, 10, top_up=False)
    assert len(sel) == 6
    assert np.bincount(sel.owners, minlength=2).tolist() == [1, 5]
    # every quota met: the same set with or without top-up
    full = [np.arange(0, 20), np.arange(20, 40)]
    assert round_robin_select(full, 10, top_up=False).items == round_robin_select(full, 10).items


def test_selection_stops_when_every_candidate_is_used() -> None:
    sel = round_robin_select([np.array([0, 1]), np.array([1, 2])], 10)
    assert sorted(sel.items) == [0, 1, 2]


def test_near_duplicates_are_dropped_and_the_query_takes_its_next_item() -> None:
    rng = np.random.default_rng(0)
    v = _unit(rng, 10, 64)
    # plant: item 1 is a near-copy of item 0; item 6 a near-copy of item 5
    v[1] = v[0] + 0.01 * rng.standard_normal(64)
    v[6] = v[5] + 0.01 * rng.standard_normal(64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ranked = [np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7, 8, 9])]
    sel = round_robin_select(ranked, 6, vectors=v, dedup_threshold=0.95)
    _check_unique(sel)
    assert 1 not in sel.items and 6 not in sel.items
    assert sel.dropped_duplicates == 2
    assert np.bincount(sel.owners, minlength=2).tolist() == [3, 3]
    # without dedup the copies get in
    plain = round_robin_select(ranked, 6)
    assert 1 in plain.items and 6 in plain.items


def test_duplicates_proposed_in_the_same_round_are_caught() -> None:
    rng = np.random.default_rng(1)
    v = _unit(rng, 4, 32)
    v[1] = v[0]
    sel = round_robin_select([np.array([0, 2]), np.array([1, 3])], 2, vectors=v, dedup_threshold=0.99)
    assert sorted(sel.items) == [0, 3]


def test_global_topn_takes_best_scores_and_never_filtered_items() -> None:
    scores = np.array([0.1, 0.9, -np.inf, 0.5, 0.7], dtype=np.float32)
    sel = global_topn_select(scores, 10)
    assert sel.items == [1, 4, 3, 0]


def test_negative_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="size"):
        round_robin_select([np.arange(3)], -1)


def test_leakage_guard_flags_planted_near_duplicates_only() -> None:
    rng = np.random.default_rng(2)
    gallery = _unit(rng, 200, 32)
    labeled = _unit(rng, 5, 32)
    gallery[[7, 42]] = labeled[[0, 3]] + 0.005
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    mask = near_duplicate_mask(gallery, labeled, 0.95, block=64)
    assert np.flatnonzero(mask).tolist() == [7, 42]
    assert not near_duplicate_mask(gallery, None, 0.95).any()


def test_crop_boxes_lie_inside_the_image_at_the_given_scales() -> None:
    boxes = crop_boxes(64, 48, 6, [0.5, 0.75], seed=3)
    assert len(boxes) == 6
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48
        s = [0.5, 0.75][i % 2]
        assert x1 - x0 == round(64 * s) and y1 - y0 == round(48 * s)
    assert boxes == crop_boxes(64, 48, 6, [0.5, 0.75], seed=3)
    assert boxes != crop_boxes(64, 48, 6, [0.5, 0.75], seed=4)


def _rows(zip_path: Path, folder: Path) -> list[dict]:
    return [
        {
            "id": 0,
            "source": str(zip_path),
            "key": "a/red.png",
            "box": None,
            "score": 0.9,
            "query_id": 0,
            "query_key": "q0.png",
            "query_label": "cat",
            "rank": 0,
            "method": "query_balanced",
        },
        {
            "id": 1,
            "source": str(zip_path),
            "key": "b/blue.png",
            "box": [0.0, 0.0, 8.0, 4.0],
            "score": 0.8,
            "query_id": 1,
            "query_key": "q1.png",
            "query_label": "dog, big",
            "rank": 0,
            "method": "query_balanced",
        },
        {
            "id": 2,
            "source": str(folder),
            "key": "sub/green.png",
            "box": None,
            "score": 0.7,
            "query_id": 0,
            "query_key": "q0.png",
            "query_label": "cat",
            "rank": 1,
            "method": "query_balanced",
        },
    ]


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    zp = tmp_path / "gallery.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        for key, colour in (("a/red.png", (255, 0, 0)), ("b/blue.png", (0, 0, 255))):
            p = tmp_path / "tmp.png"
            Image.new("RGB", (16, 16), colour).save(p)
            zf.write(p, key)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16), (0, 255, 0)).save(folder / "sub" / "green.png")
    return zp, folder


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_round_trips_and_distill_reads_it_directly(tmp_path: Path, fmt: str) -> None:
    zp, folder = _sources(tmp_path)
    rows = _rows(zp, folder)
    path = write_manifest(rows, tmp_path / f"manifest.{fmt}")
    back = read_manifest(path)
    for a, b in zip(rows, back, strict=True):
        assert {k: a[k] for k in ("id", "source", "key", "query_id", "query_label", "rank")} == {
            k: b[k] for k in ("id", "source", "key", "query_id", "query_label", "rank")
        }
        assert b["box"] == a["box"]
        assert b["score"] == pytest.approx(a["score"], abs=1e-6)
    ds = load_unlabeled(path)  # what the distill stage does with data.transfer / the curate output
    assert len(ds) == 3
    colours = [ds.load_image(i).getpixel((0, 0)) for i in range(3)]
    assert sorted(colours) == sorted([(255, 0, 0), (0, 0, 255), (0, 255, 0)])
    sizes = sorted(ds.load_image(i).size for i in range(3))
    assert sizes == [(8, 4), (16, 16), (16, 16)]  # the crop box is applied


def test_csv_manifest_cells_cannot_run_as_spreadsheet_formulas(tmp_path: Path) -> None:
    """OWASP's CSV-injection rule: a text cell starting with = + - @ TAB or CR gets a leading
    single quote, so a spreadsheet shows it as text; numbers (a negative score) stay numbers, and
    the JSONL manifest keeps the values as they are."""
    hostile = {
        "key": '=HYPERLINK("http://evil.example","click")',
        "query_key": "+cmd|' /C calc'!A0",
        "query_label": "@SUM(1)",
        "method": "-2+3",
    }
    plain = {"id": 1, "source": "/g/y", "box": [1.0, 2.0, 3.0, 4.0], "score": 0.5, "query_id": 0, "rank": 1}
    rows = [
        {"id": 0, "source": "/g/x.zip", "box": None, "score": -0.25, "query_id": 0, "rank": 0, **hostile},
        {**plain, "key": "\tTAB", "query_label": "\rCR", "query_key": "plain=fine", "method": "knn"},
    ]
    path = write_manifest(rows, tmp_path / "m.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        header, *cells = list(csv.reader(fh))
    first = dict(zip(header, cells[0], strict=True))
    second = dict(zip(header, cells[1], strict=True))
    for column, value in hostile.items():
        assert first[column] == "'" + value, (column, first[column])
    assert (second["key"], second["query_label"]) == ("'\tTAB", "'\rCR")
    assert second["query_key"] == "plain=fine" and second["source"] == "/g/y"  # only leading characters
    assert first["score"] == "-0.25" and first["id"] == "0"
    assert path.read_text().splitlines()[1].startswith('0,"/g/x.zip",')  # numbers are not text cells
    assert ",-0.25," in path.read_text()
    assert read_manifest(path)[0]["score"] == -0.25
    jsonl = read_manifest(write_manifest(rows, tmp_path / "m.jsonl"))
    assert {k: jsonl[0][k] for k in hostile} == hostile
    # reading the CSV back gives the values as they were (the writer's quote, and only it, dropped)
    back = read_manifest(path)
    assert {k: back[0][k] for k in hostile} == hostile
    assert (back[1]["key"], back[1]["query_label"], back[1]["query_key"]) == ("\tTAB", "\rCR", "plain=fine")
    quoted = read_manifest(write_manifest([{**plain, "key": "'=already quoted"}], tmp_path / "q.csv"))
    assert quoted[0]["key"] == "'=already quoted"


def test_csv_manifest_with_formula_like_keys_loads_the_right_images(tmp_path: Path) -> None:
    """A transfer set read from its CSV manifest finds items whose keys start with '-' or '@'."""
    folder = tmp_path / "g"
    for name in ("-dash.png", "@eaDir.png"):
        write_image(folder / name, 12, 10)
    rows = [
        {"id": i, "source": str(folder), "key": k, "box": None, "score": 0.5, "query_id": 0, "rank": i}
        for i, k in enumerate(("-dash.png", "@eaDir.png"))
    ]
    ds = load_unlabeled(write_manifest(rows, tmp_path / "m.csv"))
    assert len(ds) == 2 and ds.load_image(0).size == (12, 10) and ds.load_image(1).size == (12, 10)


def test_manifest_with_a_moved_source_says_so(tmp_path: Path) -> None:
    zp, folder = _sources(tmp_path)
    path = write_manifest(_rows(zp, folder), tmp_path / "m.jsonl")
    zp.rename(tmp_path / "elsewhere.zip")
    with pytest.raises(DatasetError, match=r"not an existing folder, \.zip or \.tar"):
        load_unlabeled(path)


def test_manifest_row_without_key_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text(
        json.dumps({"source": str(tmp_path), "key": "x.png"})
        + "\n"
        + json.dumps({"source": "s", "key": ""})
        + "\n"
    )
    with pytest.raises(DatasetError, match=r"m.jsonl:2: every row needs a 'source' and a 'key'"):
        load_unlabeled(p)


def test_unknown_manifest_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"use one of \.jsonl, \.csv, \.parquet"):
        write_manifest([], tmp_path / "m.txt")
