"""The inference lane: POSTs to an inference path skip Starlette's router and exception middleware, and are
answered as before (the handler's response, errors in the OpenAI shape by the app's handlers)."""

from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from serverless_vllm.dataplane.endpoints import InferenceEndpoint
from serverless_vllm.dataplane.inference_lane import install_inference_lane
from serverless_vllm.dataplane.inference_routes import inference_routes
from serverless_vllm.errors import APIError, install_error_handlers
from starlette.exceptions import HTTPException


async def handle(request: Request, endpoint: InferenceEndpoint) -> Response:
    body = await request.body()
    if body == b"api-error":
        raise APIError(400, "bad body", "invalid_request")
    if body == b"too-large":
        raise HTTPException(413, "request body larger than 4 bytes")  # as the guard's body limit raises it
    if body == b"bug":
        raise KeyError("a bug")
    # Starlette's router puts the matched endpoint in the scope: absent when the lane served the request.
    return Response(body, headers={"x-path": endpoint.path, "x-routed": str("endpoint" in request.scope)})


def make_app(lane: bool = True) -> FastAPI:
    app = FastAPI()
    routes = inference_routes(handle)
    app.include_router(routes)
    if lane:
        install_inference_lane(app, routes)
    install_error_handlers(app)

    @app.get("/other")
    async def other(request: Request) -> dict[str, bool]:
        return {"routed": "endpoint" in request.scope}

    return app


def test_an_inference_post_is_served_by_the_lane_not_the_router() -> None:
    with TestClient(make_app()) as client:
        resp = client.post("/v1/chat/completions", content=b"hello")
    assert resp.status_code == 200 and resp.content == b"hello"
    assert resp.headers["x-path"] == "/v1/chat/completions"
    assert resp.headers["x-routed"] == "False"
    with TestClient(make_app(lane=False)) as client:  # what the test tells apart: the router's way
        assert client.post("/v1/chat/completions", content=b"hello").headers["x-routed"] == "True"


def test_errors_are_answered_by_the_app_handlers_in_the_openai_shape() -> None:
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        api_error = client.post("/v1/completions", content=b"api-error")
        too_large = client.post("/v1/completions", content=b"too-large")
        bug = client.post("/v1/completions", content=b"bug")
    assert api_error.status_code == 400
    assert api_error.json() == {
        "error": {"message": "bad body", "type": "invalid_request_error", "param": None, "code": "invalid_request"}
    }
    assert too_large.status_code == 413 and too_large.json()["error"]["message"] == "request body larger than 4 bytes"
    assert bug.status_code == 500 and bug.json()["error"]["code"] == "internal_error"


def test_everything_else_goes_the_usual_way() -> None:
    with TestClient(make_app()) as client:
        wrong_method = client.get("/v1/chat/completions")
        other = client.get("/other")
        unknown = client.post("/v1/nothing", content=b"x")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert other.json() == {"routed": True}
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
