"""Write the API reference (``docs/api.md``) from the service's OpenAPI schema.

    python -m kt_client.gen_api_docs > docs/api.md
    python -m kt_client.gen_api_docs --url http://127.0.0.1:8000   # a running server's schema

``tests/client/test_api_docs.py`` fails when the committed file differs from what this prints (a
route or field changed without regenerating it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any

HEADER = """# vfm-kt HTTP API reference

<!-- Generated from the OpenAPI schema by `python -m kt_client.gen_api_docs > docs/api.md`; do not edit. -->

{summary}

- Base URL: the server (`kt serve` prints it; default `http://127.0.0.1:8000`). Interactive docs: `/docs`;
  the schema: `/v1/openapi.json`.
- Authentication: every `/v1` route needs an API key, `Authorization: Bearer kt_...`
  (`kt admin create-key --tenant NAME`). A tenant sees only its own resources: another tenant's id is a 404.
- Errors: JSON `{{"detail": "<what went wrong and what to do>"}}` (a 422 also carries FastAPI's `errors`
  list). 401: missing or unknown key; 429: the key's rate limit, retry after `Retry-After` seconds;
  503: a dependency (database, queue) is unreachable, retry later.
- Clients: `kt_client.Client` / `AsyncClient` (Python) and the `kt` command line; see
  [the tutorial](tutorial.md).
"""


def local_schema() -> dict[str, Any]:
    """The schema of the service as built here (no server, no database: ``migrate=False``)."""
    from service.app import create_app
    from service.settings import Settings

    with tempfile.TemporaryDirectory(prefix="kt-api-docs-") as tmp:
        app = create_app(Settings(data_dir=tmp), migrate=False)
        return dict(app.openapi())


def remote_schema(url: str) -> dict[str, Any]:
    import httpx

    resp = httpx.get(url.rstrip("/") + "/v1/openapi.json", timeout=30)
    resp.raise_for_status()
    return dict(resp.json())


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(schema: dict[str, Any]) -> str:
    """A short type: ``string``, ``integer``, ``StageSteps``, ``array of string``, ``string | null``."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " \\| ".join(_type(s) for s in schema["anyOf"])
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _type(schema["allOf"][0])
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if (
        kind == "object"
        and "additionalProperties" in schema
        and isinstance(schema["additionalProperties"], dict)
    ):
        return f"object of {_type(schema['additionalProperties'])}"
    if "format" in schema and kind == "string":
        return f"string ({schema['format']})"
    return str(kind)


def _constraints(schema: dict[str, Any]) -> str:
    parts = []
    for key, label in (
        ("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
        ("minLength", "min length"), ("maxLength", "max length"), ("minItems", "min items"),
        ("maxItems", "max items"), ("pattern", "pattern"),
    ):  # fmt: skip
        if key in schema:
            value = schema[key]
            parts.append(f"{label} `{value}`" if key == "pattern" else f"{label} {value}")
    for sub in schema.get("anyOf", []):
        extra = _constraints(sub)
        if extra:
            parts.append(extra)
    return ", ".join(parts)


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(schema: dict[str, Any]) -> str:
    return f"`{json.dumps(schema['default'])}`" if "default" in schema else ""


def _operation(method: str, path: str, op: dict[str, Any]) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", ""]
    if op.get("summary"):
        lines += [f"**{op['summary']}**", ""]
    if op.get("description"):
        lines += [op["description"].strip(), ""]
    params = op.get("parameters", [])
    if params:
        lines += ["| parameter | in | type | required | default | description |", "|---|---|---|---|---|---|"]
        for p in params:
            schema = p.get("schema", {})
            desc = " ".join(
                x for x in (p.get("description") or schema.get("description", ""), _constraints(schema)) if x
            )
            lines.append(
                f"| `{p['name']}` | {p['in']} | {_type(schema)} | {'yes' if p.get('required') else 'no'} "
                f"| {_default(schema)} | {_cell(desc)} |"
            )
        lines.append("")
    body = op.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            lines.append(
                f"Request body ({media}{', required' if body.get('required') else ''}): {_type(content.get('schema', {}))}"
            )
            props = content.get("schema", {}).get("properties")
            if props and "$ref" not in content.get("schema", {}):
                lines.append("")
                lines += _fields(content["schema"])
        lines.append("")
    lines += ["| status | description | body |", "|---|---|---|"]
    for code, resp in sorted(op.get("responses", {}).items()):
        bodies = ", ".join(
            f"{media}: {_type(c.get('schema', {}))}" if c.get("schema") else media
            for media, c in (resp.get("content") or {}).items()
        )
        lines.append(f"| {code} | {_cell(resp.get('description', ''))} | {bodies} |")
    lines.append("")
    return lines


def _fields(schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", []))
    lines = ["| field | type | required | default | description |", "|---|---|---|---|---|"]
    for name, prop in schema.get("properties", {}).items():
        desc = " ".join(x for x in (prop.get("description", ""), _constraints(prop)) if x)
        lines.append(
            f"| `{name}` | {_type(prop)} | {'yes' if name in required else 'no'} | {_default(prop)} | {_cell(desc)} |"
        )
    return lines


def render(schema: dict[str, Any]) -> str:
    info = schema.get("info", {})
    out = [HEADER.format(summary=info.get("summary") or info.get("description") or "").rstrip(), ""]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            if isinstance(op, dict) and "responses" in op:
                tag = (op.get("tags") or ["service"])[0]
                by_tag.setdefault(tag, []).append((method, path, op))
    out += ["## Endpoints", ""]
    for tag, ops in by_tag.items():
        out.append(f"- **{tag}**: " + ", ".join(f"`{m.upper()} {p}`" for m, p, _ in ops))
    out.append("")
    for tag, ops in by_tag.items():
        out += [f"## {tag[:1].upper()}{tag[1:]}", ""]
        for method, path, op in ops:
            out += _operation(method, path, op)
    out += ["## Schemas", ""]
    for name, comp in sorted(schema.get("components", {}).get("schemas", {}).items()):
        out += [f"### {name}", ""]
        if comp.get("description"):
            out += [" ".join(comp["description"].split()), ""]
        if comp.get("properties"):
            out += [*_fields(comp), ""]
        else:
            out += [f"Type: {_type(comp)}", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kt_client.gen_api_docs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", help="read the schema of this running server instead of building the app")
    args = parser.parse_args(argv)
    schema = remote_schema(args.url) if args.url else local_schema()
    sys.stdout.write(render(schema))
    return 0


if __name__ == "__main__":
    sys.exit(main())
