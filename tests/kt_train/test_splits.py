"""kt_train.splits and `kt datasets split`: train/test/rest zips cut from a user's ImageFolder."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kt_train.splits import SplitError, split_imagefolder
from tests.kt_train._images import make_imagefolder, zip_folder

CLASSES = {"AnnualCrop": 8, "Forest": 7, "River": 9}
REPO = Path(__file__).resolve().parents[2]


def _names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return sorted(zf.namelist())


def _per_class(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n.split("/", 1)[0]] = out.get(n.split("/", 1)[0], 0) + 1
    return out


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    make_imagefolder(root, CLASSES)
    return root


def test_counts_disjoint_and_complete(folder: Path, tmp_path: Path) -> None:
    src = zip_folder(folder, tmp_path / "all.zip")
    res = split_imagefolder(src, tmp_path / "out", per_class=2, test_per_class=3, seed=0)
    assert res.classes == sorted(CLASSES)
    train, test, rest = (_names(tmp_path / "out" / f"{n}.zip") for n in ("train", "test", "rest"))
    assert _per_class(train) == {c: 2 for c in CLASSES}
    assert _per_class(test) == {c: 3 for c in CLASSES}
    assert _per_class(rest) == {c: n - 5 for c, n in CLASSES.items()}
    assert not set(train) & set(test) and not set(train) & set(rest) and not set(test) & set(rest)
    assert sorted(train + test + rest) == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*.*")
    )
    assert res.counts == {"train": 6, "test": 9, "rest": 9}
    with zipfile.ZipFile(tmp_path / "out" / "train.zip") as zf, zipfile.ZipFile(src) as orig:
        assert all(zf.read(n) == orig.read(n) for n in zf.namelist())  # the bytes, unchanged


def test_deterministic_by_seed_and_folder_equals_zip(folder: Path, tmp_path: Path) -> None:
    src = zip_folder(folder, tmp_path / "all.zip")
    split_imagefolder(src, tmp_path / "a", 2, 3, seed=1)
    split_imagefolder(folder, tmp_path / "b", 2, 3, seed=1)
    split_imagefolder(src, tmp_path / "c", 2, 3, seed=2)
    for n in ("train", "test", "rest"):
        assert _names(tmp_path / "a" / f"{n}.zip") == _names(tmp_path / "b" / f"{n}.zip")
    assert _names(tmp_path / "a" / "train.zip") != _names(tmp_path / "c" / "train.zip")


@pytest.mark.parametrize("top", ["EuroSAT_RGB/", "2750/", "data/EuroSAT_RGB/"])
def test_class_folders_under_one_top_folder(folder: Path, tmp_path: Path, top: str) -> None:
    src = zip_folder(folder, tmp_path / "nested.zip", prefix=top)
    res = split_imagefolder(src, tmp_path / "out", 1, 1, seed=0, rest=False)
    assert res.classes == sorted(CLASSES)
    assert not (tmp_path / "out" / "rest.zip").exists()
    train = _names(tmp_path / "out" / "train.zip")
    assert _per_class(train) == {c: 1 for c in CLASSES}  # entries are <class>/<image>, the top folder gone


def test_errors(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="does not exist"):
        split_imagefolder(tmp_path / "nope.zip", tmp_path / "o", 1, 1)
    with pytest.raises(SplitError, match=r"fewer than .* = 8 images \(Forest: 7\)"):
        split_imagefolder(folder, tmp_path / "o", 4, 4)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(SplitError, match="no class folders"):
        split_imagefolder(empty, tmp_path / "o", 1, 1)


def _kt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kt_client.cli", "datasets", "split", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(folder: Path, tmp_path: Path) -> None:
    src = zip_folder(folder, tmp_path / "EuroSAT_RGB.zip", prefix="EuroSAT_RGB/")
    out = tmp_path / "splits"
    res = _kt(str(src), "--per-class", "2", "--test-per-class", "3", "--seed", "0", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert f"{out / 'train.zip'}: 6 images" in res.stdout and f"{out / 'rest.zip'}: 9 images" in res.stdout
    assert _per_class(_names(out / "test.zip")) == {c: 3 for c in CLASSES}

    missing = _kt(str(tmp_path / "missing.zip"), "-o", str(out))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    short = _kt(str(src), "--per-class", "5", "--test-per-class", "5", "-o", str(out))
    assert short.returncode == 2 and "Forest: 7" in short.stderr and "lower the counts" in short.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = _kt(str(empty), "-o", str(out))
    assert none.returncode == 2 and "no class folders" in none.stderr
