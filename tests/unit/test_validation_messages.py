"""Request bodies that are not an object of the route's schema, answered in one line by every app's handlers
(errors.py): what pydantic says of a body that is not an object at all is said as the inference routes say it."""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import FastAPI, Path
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict
from serverless_vllm.errors import install_error_handlers


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: int = 1


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/things")
    async def make(spec: Spec) -> dict[str, str]:
        return {"name": spec.name}

    @app.get("/things/{name}")
    async def show(name: Annotated[str, Path(pattern="^[a-z]+$")], size: int = 1) -> dict[str, str]:
        return {"name": name}

    return TestClient(app)


@pytest.mark.parametrize(
    ("content", "message", "param"),
    [
        ("null", "request body must be a JSON object (it was empty or null)", None),
        ("", "request body must be a JSON object (it was empty or null)", None),
        ("[]", "request body must be a JSON object", None),
        ('"x"', "request body must be a JSON object", None),
        ("{bad", "request body is not valid JSON: Expecting property name enclosed in double quotes", None),
        (
            '{"size": "big"}',
            "name: Field required; size: Input should be a valid integer, unable to parse string as an integer",
            None,  # two fields: OpenAI's `param` names one
        ),
        ('{"name": "a", "colour": 1}', "colour: Extra inputs are not permitted", "colour"),
        ('{"name": "a", "size": [1]}', "size: Input should be a valid integer", "size"),
    ],
)
def test_a_bad_body_is_one_clear_line(client: TestClient, content: str, message: str, param: str | None) -> None:
    resp = client.post("/things", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error.pop("details", None) == ({"param": param} if param else None)
    assert error == {"message": message, "type": "invalid_request_error", "param": param, "code": "invalid_request"}


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_a_body_not_sent_as_json_is_told_the_type_it_needs(client: TestClient, content_type: str | None) -> None:
    # What `curl -d '{...}'` sends without `-H 'content-type: application/json'`: the first type. FastAPI does not
    # read such a body as JSON (a web page's request without a CORS preflight could otherwise act on a local API);
    # the message says what to send instead of that a JSON object is not one.
    headers = {"content-type": content_type} if content_type else {}
    resp = client.post("/things", content='{"name": "a"}', headers=headers)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == (
        "request body must be sent as JSON, with the header Content-Type: application/json"
    )


def test_a_body_nested_deeper_than_the_parser_goes_is_one_clear_line(client: TestClient) -> None:
    # FastAPI answers it "There was an error parsing the body" (its JSON parser raised RecursionError).
    body = '{"name": ' + "[" * 100_000 + "]" * 100_000 + "}"
    resp = client.post("/things", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"] == {
        "message": "request body is not valid JSON: maximum recursion depth exceeded while decoding a JSON array "
        "from a unicode string",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_request",
    }


@pytest.mark.parametrize(
    ("url", "param", "message"),
    [
        ("/things/A1", "name", "name: String should match pattern '^[a-z]+$'"),
        ("/things/a?size=big", "size", "size: Input should be a valid integer, unable to parse string as an integer"),
    ],
)
def test_a_path_or_query_parameter_is_named_as_the_client_wrote_it(
    client: TestClient, url: str, param: str, message: str
) -> None:
    """`param` names the parameter (`name`), not FastAPI's place of it (`path.name`, `query.size`)."""
    error = client.get(url).json()["error"]
    assert (error["param"], error["message"]) == (param, message)
