"""The user docs work with nothing but the product and a downloaded dataset (issue 13 item 6).

Rule: no developer paths (``../shared``, ``/work/``) in docs/*.md or README.md, except in README's
``## Benchmarks`` section (up to the next ``## `` heading), which describes bench/ and its data.
Every ``kt <command> [<subcommand>]`` in docs/tutorial.md's code blocks exists (its --help exits 0).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kt_client.cli import app

REPO = Path(__file__).resolve().parents[1]
DEV_PATHS = ("../shared", "/work/")
USER_DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]


def _user_lines(path: Path) -> list[tuple[int, str]]:
    out, in_bench = [], False
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("## "):
            in_bench = path.name == "README.md" and line.strip() == "## Benchmarks"
        if not in_bench:
            out.append((i, line))
    return out


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.name)
def test_no_developer_paths(path: Path) -> None:
    bad = [
        f"{path.name}:{i}: {line.strip()}"
        for i, line in _user_lines(path)
        if any(d in line for d in DEV_PATHS)
    ]
    assert not bad, "developer paths in user docs (keep them in bench/):\n" + "\n".join(bad)


def _tutorial_commands() -> list[list[str]]:
    text = (REPO / "docs" / "tutorial.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    cmds: set[tuple[str, ...]] = set()
    for block in blocks:
        for m in re.finditer(r"(?:^|[\s$(])kt ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", block, flags=re.M):
            cmds.add(tuple(w for w in m.groups() if w))
    return [list(c) for c in sorted(cmds)]


def test_tutorial_uses_the_split_command_and_names_the_download() -> None:
    text = (REPO / "docs" / "tutorial.md").read_text()
    assert ["datasets", "split"] in _tutorial_commands()
    assert "zenodo.org/records/7711810" in text and "EuroSAT_RGB.zip" in text


@pytest.mark.parametrize("words", _tutorial_commands(), ids=" ".join)
def test_tutorial_commands_exist(words: list[str]) -> None:
    if words[0] in ("serve", "demo"):  # they pass --help through to their own parser
        words = words[:1]
    res = CliRunner().invoke(app, [*words, "--help"])
    assert res.exit_code == 0, f"kt {' '.join(words)} --help: {res.output}"


def test_scale_plan_cites_committed_measurements() -> None:
    """docs/scale.md derives every figure from bench/results/: each file it names must exist."""
    text = (REPO / "docs" / "scale.md").read_text()
    cited = set(re.findall(r"bench/results/[\w.-]+\.(?:json|md)", text))
    assert cited, "docs/scale.md names no bench/results file; say where each figure comes from"
    missing = sorted(c for c in cited if not (REPO / c).is_file())
    assert not missing, f"docs/scale.md cites results that are not committed: {missing}"
    assert "docs/scale.md" in (REPO / "README.md").read_text()
