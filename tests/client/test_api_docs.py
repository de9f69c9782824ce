"""docs/api.md is generated from the OpenAPI schema; a route or field changed without regenerating
it fails here."""

from __future__ import annotations

from kt_client.gen_api_docs import local_schema, render
from tests.client.conftest import REPO

REGENERATE = "regenerate it: .venv/bin/python -m kt_client.gen_api_docs > docs/api.md"


def test_docs_api_md_is_up_to_date() -> None:
    schema = local_schema()
    committed = (REPO / "docs" / "api.md").read_text()
    for path, operations in schema["paths"].items():
        for method in operations:
            assert f"### `{method.upper()} {path}`" in committed, (
                f"{method.upper()} {path} is not in docs/api.md; {REGENERATE}"
            )
    assert committed == render(schema), f"docs/api.md differs from the OpenAPI schema; {REGENERATE}"


def test_render_lists_a_new_route() -> None:
    schema = local_schema()
    schema["paths"]["/v1/new"] = {"get": {"summary": "New", "responses": {"200": {"description": "ok"}}}}
    assert "### `GET /v1/new`" in render(schema)
