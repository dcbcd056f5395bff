"""
The OpenAPI document (L{cim.route.openapi}) against the app it describes.
"""

from __future__ import annotations

import json

import pytest

from cim.route.api import RouteAPI
from cim.route.fields import REQUESTS, Limits
from cim.route.openapi import openapi_document
from tests.test_route import Route

#: Methods werkzeug adds by itself.
IMPLICIT = {"HEAD", "OPTIONS"}


def app_operations() -> set[tuple[str, str]]:
    """
    Every (path, method) the Klein app routes.
    """
    return {
        (rule.rule, method.lower())
        for rule in RouteAPI.app.url_map.iter_rules()
        for method in (rule.methods or set()) - IMPLICIT
    }


def documented_operations() -> set[tuple[str, str]]:
    document = openapi_document()
    return {
        (path, method) for path, item in document["paths"].items() for method in item
    }


def test_every_route_is_documented_and_nothing_else() -> None:
    assert app_operations() == documented_operations()


def test_document_shape() -> None:
    document = openapi_document(max_message=100)
    assert document["openapi"].startswith("3.0")
    envelope = document["components"]["schemas"]["Envelope"]
    assert envelope["required"] == ["code", "message", "reqNo", "dataBody"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["summary"], (path, method)
            assert "200" in operation["responses"], (path, method)
            if method == "post" and path != "/onlineUser":
                schema = operation["requestBody"]["content"]["application/json"][
                    "schema"
                ]
                assert schema["type"] == "object" and schema["properties"], path
    p2p = document["paths"]["/p2pRoute"]["post"]["requestBody"]["content"]
    assert p2p["application/json"]["schema"]["properties"]["msg"]["maxLength"] == 100
    # Every reference resolves.
    schemas = document["components"]["schemas"]
    text = json.dumps(document)
    for ref in set(text.split('"$ref": "')[1:]):
        name = ref.split('"')[0].rsplit("/", 1)[-1]
        assert name in schemas


def test_the_device_key_is_documented_once_each_way() -> None:
    document = openapi_document()
    login = document["paths"]["/login"]["post"]
    request = login["requestBody"]["content"]["application/json"]["schema"]
    # The request field comes from cim.route.fields (declared once there).
    assert (
        request["properties"]["deviceKey"]
        == REQUESTS["/login"].schema(Limits())["properties"]["deviceKey"]
    )
    assert "deviceKey" not in request.get("required", [])
    reply = document["components"]["schemas"]["LoginResult"]
    assert reply["properties"]["deviceKey"]["type"] == "string"
    assert "X-Cim-Extended" in reply["properties"]["deviceKey"]["description"]
    assert "deviceKey" not in reply["required"]


def test_document_is_valid_openapi() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(openapi_document())


def test_served_document_is_the_module_one() -> None:
    route = Route(max_message=123)
    status, raw = route.request("GET", "/openapi.json")
    assert status == 200
    assert json.loads(raw) == openapi_document(max_message=123)


@pytest.mark.parametrize("path, method", sorted(documented_operations()))
def test_every_documented_operation_answers(path: str, method: str) -> None:
    route = Route()
    body: dict | None = {} if method == "post" else None
    status, raw = route.request(method.upper(), path, body)
    assert status not in (404, 405, 500), (path, method, raw)
    if path not in ("/metrics", "/openapi.json"):
        answer = json.loads(raw)
        assert set(answer) == {"code", "message", "reqNo", "dataBody"}
