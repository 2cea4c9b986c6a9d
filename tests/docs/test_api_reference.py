"""docs/API.md against the code it documents: the route list and each route's request fields (names, which are
required, the defaults the schema declares) against the running app's OpenAPI schema, and the deployment-argument
tables against the pydantic models that validate them. A route, field or setting added, removed or renamed without
the reference following fails here."""
from __future__ import annotations

import json
import re

import pytest

from serve_app.routes import create_http_app
from serve_app.service import RerankService
from serve_app.settings import AppSettings, IngressSettings, ModelSettings
from tests.conftest import REPO_ROOT
from tests.serve_app.fakes import FakeBackend, FakeEncoder

API_MD = REPO_ROOT / "docs" / "API.md"
ROUTES_HEADER = "| method | path | key needed | what it does |"
FIELDS_HEADER = "| field | type | default | meaning |"
ROUTE = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE) (/\S*)")


def sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, lines up to the next heading) for every Markdown heading, code blocks skipped."""
    out: list[tuple[str, list[str]]] = []
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.append((line.lstrip("#").strip(), []))
        elif out:
            out[-1][1].append(line)
    return out


def table(lines: list[str], header: str) -> list[list[str]] | None:
    """The rows of the first table of `lines` with exactly `header`, cells stripped of spaces and backticks."""
    for i, line in enumerate(lines):
        if line.strip() == header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
            return rows
    return None


def name(cell: str) -> str:
    return cell.strip("`")


@pytest.fixture(scope="module")
def doc() -> list[tuple[str, list[str]]]:
    return sections(API_MD.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def openapi() -> dict:
    settings = AppSettings(models=[{"name": "a", "model_id": "fake/a"}], api_key="k", hf_token=None)
    service = RerankService(settings, {"a": FakeEncoder()}, {"a": FakeBackend()})
    return create_http_app(service).openapi()


def test_the_route_table_lists_exactly_the_apps_routes(doc, openapi):
    (routes,) = [table(lines, ROUTES_HEADER) for heading, lines in doc if heading == "Routes"]
    documented = {(method, name(path)) for method, path, *_ in routes}
    served = {(method.upper(), path) for path, ops in openapi["paths"].items() for method in ops}
    assert documented == served
    for method, path, key, _ in routes:  # the key column says what the guard does
        assert key == ("no" if path in ("`/health`",) else "yes"), (method, path, key)


def test_every_route_has_a_section_with_its_request_fields(doc, openapi):
    seen = set()
    for heading, lines in doc:
        for method, path in ROUTE.findall(heading):
            op = openapi["paths"][path][method.lower()]
            seen.add((method, path))
            rows = table(lines, FIELDS_HEADER)
            body = op.get("requestBody")
            if body is None:
                assert rows is None, f"{method} {path} takes no body but documents fields"
                continue
            assert rows is not None, f"{method} {path}: no `{FIELDS_HEADER}` table"
            ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
            schema = openapi["components"]["schemas"][ref]
            documented = {name(row[0]): row for row in rows}
            assert set(documented) == set(schema["properties"]), f"{method} {path}"
            for field, (_, _, default, _) in documented.items():
                assert (default == "required") == (field in schema.get("required", [])), (path, field, default)
                declared = schema["properties"][field].get("default")
                if declared is not None:
                    assert json.dumps(declared).lower() in default.lower(), (path, field, default, declared)
    served = {(method.upper(), path) for path, ops in openapi["paths"].items() for method in ops}
    assert seen == served


@pytest.mark.parametrize("model", [AppSettings, ModelSettings, IngressSettings])
def test_the_deployment_argument_tables_list_exactly_the_settings(doc, model):
    (rows,) = [table(lines, FIELDS_HEADER) for heading, lines in doc if f"(`{model.__name__}`)" in heading]
    assert rows, f"no `{FIELDS_HEADER}` table under the heading naming {model.__name__}"
    documented = {name(row[0]): row for row in rows}
    assert set(documented) == set(model.model_fields)
    for field, info in model.model_fields.items():
        default = documented[field][2]
        assert (default == "required") == info.is_required(), (model.__name__, field, default)
        if not info.is_required() and info.default_factory is None and info.default not in (None, ""):
            assert json.dumps(info.default).strip('"').lower() in default.lower(), (field, default, info.default)
