"""The error table: each exception a request can meet gets its status, type, outcome and
message, and a full queue its `Retry-After`."""

from __future__ import annotations

import pytest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import VLLMValidationError

from vllm_omni_images.engine.errors import (
    EngineError,
    EngineHungError,
    EngineNotReadyError,
    EngineOutOfMemoryError,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
    SchedulerClosedError,
)
from vllm_omni_images.images.errors import error_kind, error_response, response_headers


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
        (SchedulerClosedError(), 503, "ServiceUnavailableError", "unavailable", None, "shut down"),
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


def test_vllms_own_error_responses_carry_no_headers():
    from vllm.entrypoints.serve import create_error_response

    assert response_headers(create_error_response("unknown model")) == {}
