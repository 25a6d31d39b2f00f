"""PlainRoute: the inference routes' cheaper serving keeps what clients and the OpenAPI document see."""

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.testclient import TestClient
from serverless_vllm.dataplane.inference_routes import PlainRoute
from serverless_vllm.errors import APIError, install_error_handlers


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter(route_class=PlainRoute)

    @router.post("/echo", openapi_extra={"x-documented": True})
    async def echo(request: Request) -> Response:
        body = await request.body()
        if body == b"bad":
            raise APIError(400, "bad body", "invalid_request")
        # FastAPI's per-request machinery (dependency solving and its exit stacks) never ran.
        machinery = "fastapi_inner_astack" in request.scope
        return Response(body, headers={"x-machinery": str(machinery)})

    app.include_router(router)
    return app


def test_endpoint_gets_the_request_and_its_response_is_sent_as_is() -> None:
    with TestClient(make_app()) as client:
        resp = client.post("/echo", content=b"hello")
    assert resp.status_code == 200 and resp.content == b"hello"
    assert resp.headers["x-machinery"] == "False"


def test_errors_reach_the_app_handlers_in_the_openai_shape() -> None:
    with TestClient(make_app()) as client:
        resp = client.post("/echo", content=b"bad")
        wrong_method = client.get("/echo")
    assert resp.status_code == 400
    assert resp.json() == {
        "error": {"message": "bad body", "type": "invalid_request_error", "param": None, "code": "invalid_request"}
    }
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_route_is_still_in_the_openapi_document() -> None:
    operation = make_app().openapi()["paths"]["/echo"]["post"]
    assert operation["x-documented"] is True
