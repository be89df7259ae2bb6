"""The error table: each exception a request can meet gets its status, type, outcome and
message, and a full queue its `Retry-After`."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError, model_validator
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.engine.errors import (
    EngineClosedError,
    EngineError,
    EngineHungError,
    EngineNotReadyError,
    EngineOutOfMemoryError,
    LoRAAdapterError,
    LoRAAdapterUnavailableError,
    LoRAStackError,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
)
from vllm_omni_images.images.errors import (
    ERROR_TABLE,
    HeadTooLargeError,
    ImageNotFoundError,
    ModelNotFoundError,
    ReadTimeoutError,
    TextOnlyRouteError,
    error_kind,
    error_response,
    response_headers,
)


@pytest.mark.parametrize(
    ("error", "status", "error_type", "outcome", "param", "fragment"),
    [
        (
            VLLMValidationError("size '1x1' is not supported", parameter="size"),
            400,
            "BadRequestError",
            "invalid",
            "size",
            "not supported",
        ),
        (RequestTooLargeError(11, 8), 400, "BadRequestError", "invalid", "n", "--image-max-queue"),
        (QueueFullError(2.2), 429, "RateLimitError", "rejected", None, "The server is busy"),
        (RequestTimeoutError(5), 504, "TimeoutError", "timeout", None, "within 5 s"),
        (
            EngineNotReadyError("not loaded"),
            503,
            "ServiceUnavailableError",
            "unavailable",
            None,
            "not loaded",
        ),
        (EngineClosedError(), 503, "ServiceUnavailableError", "unavailable", None, "shutting down"),
        (
            EngineHungError(60),
            503,
            "ServiceUnavailableError",
            "unavailable",
            None,
            "not responding: a call did not stop 60 s after",
        ),
        (
            EngineOutOfMemoryError("one 64x64 image did not fit, even alone"),
            503,
            "ServiceUnavailableError",
            "out_of_memory",
            None,
            "out of GPU memory generating this request (one 64x64 image did not fit, even",
        ),
        (
            ModelNotFoundError("dall-e-3" * 50),
            404,
            "NotFoundError",
            "invalid",
            "model",
            "The model `dall-e-3dall-e-3",
        ),
        (ImageNotFoundError("a.png"), 404, "NotFoundError", "invalid", None, "No such image"),
        (
            TextOnlyRouteError("/tokenize", "tiny"),
            404,
            "NotFoundError",
            "invalid",
            None,
            "/tokenize is not available: this server serves the image model `tiny`",
        ),
        (
            LoRAAdapterUnavailableError(LoRAAdapterError("ink", "its rank 64 is above 16")),
            503,
            "ServiceUnavailableError",
            "unavailable",
            "model",
            "LoRA adapter 'ink' is not available: it was read again from its lora_path and "
            "cannot be served now (its rank 64 is above 16). Load it again",
        ),
        (
            LoRAStackError("The LoRA adapters 'a', 'b' cannot be applied together"),
            400,
            "BadRequestError",
            "invalid",
            "lora",
            "'a', 'b' cannot be applied together",
        ),
        (
            ReadTimeoutError("The request body did not all arrive within 1 s"),
            408,
            "TimeoutError",
            "invalid",
            None,
            "did not all arrive within 1 s",
        ),
        (
            HeadTooLargeError("The request has more than 8 headers"),
            431,
            "BadRequestError",
            "invalid",
            None,
            "more than 8 headers",
        ),
        (EngineError("NaNs"), 500, "InternalServerError", "error", None, "NaNs"),
        (KeyError("bug"), 500, "InternalServerError", "error", None, "bug"),
    ],
)
def test_each_exception_has_its_answer(error, status, error_type, outcome, param, fragment):
    response = error_response(error)
    assert isinstance(response, ErrorResponse)
    assert response.error.code == status
    assert response.error.type == error_type
    assert response.error.param == param
    assert fragment in response.error.message
    assert error_kind(error).outcome == outcome
    # The JSON body is OpenAI's error shape and nothing else.
    assert set(response.model_dump()) == {"error"}
    assert set(response.model_dump()["error"]) == {"message", "type", "param", "code"}


def test_a_full_queue_says_when_to_retry():
    response = error_response(QueueFullError(2.2))
    assert response_headers(response) == {"Retry-After": "3"}
    assert response_headers(error_response(EngineError("x"))) == {}


def test_a_read_timeout_closes_the_connection():
    """RFC 9110's 408: the server closes a connection whose request came too slowly."""
    assert response_headers(error_response(ReadTimeoutError("late"))) == {"Connection": "close"}


def test_vllms_own_error_responses_carry_no_headers():
    from vllm.entrypoints.serve import create_error_response

    assert response_headers(create_error_response("unknown model")) == {}


class WrappedValidationError(VLLMValidationError, ValueError):
    """A `VLLMValidationError` that pydantic wraps: vLLM versions where it is a `ValueError`."""


class Refusing(BaseModel):
    n: int = 1
    stream: bool = False

    @model_validator(mode="after")
    def _one_streamed_image(self) -> Refusing:
        if self.stream and self.n > 1:
            raise WrappedValidationError("stream returns one image: send n=1.", parameter="n")
        return self


def test_a_wrapped_validation_error_reads_as_it_does_unwrapped():
    """A validator's `VLLMValidationError` reaches the client with its own message and
    `parameter`, whether pydantic wraps it (here) or lets it through (vLLM's own class)."""
    with pytest.raises(ValidationError) as info:
        Refusing(n=2, stream=True)
    wrapped = error_response(info.value).error
    unwrapped = error_response(
        WrappedValidationError("stream returns one image: send n=1.", parameter="n")
    )
    assert wrapped == unwrapped.error
    assert (wrapped.code, wrapped.param) == (400, "n")
    assert wrapped.message == "stream returns one image: send n=1. (parameter=n)"
    # As FastAPI reports it for a JSON body, with the body's location.
    body_error = RequestValidationError(
        [{**error, "loc": ("body", *error["loc"])} for error in info.value.errors()]
    )
    assert error_response(body_error).error == unwrapped.error


IMAGE_ROUTES = ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations")


def test_each_image_route_documents_every_status_the_table_answers():
    """`/openapi.json` lists, for each image route, every status its errors can have: each
    row of the table, anything else (500), and an unknown model (404)."""
    from fastapi import FastAPI

    from vllm_omni_images.images.api_router import attach_router

    app = FastAPI()
    attach_router(app)
    expected = {str(kind.status.value) for _, kind in ERROR_TABLE} | {"500", "404"}
    assert expected == {"400", "404", "408", "413", "429", "431", "500", "503", "504"}
    paths = app.openapi()["paths"]
    for route in IMAGE_ROUTES:
        responses = paths[route]["post"]["responses"]
        assert expected <= set(responses), route
        for status in expected:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (route, status)
        assert "Retry-After" in responses["429"]["headers"]
