"""Every exception the engine layer raises, defined once; `images/errors.py` maps each one a
client can see to its answer. `GenerationCancelled` never leaves this layer."""

from __future__ import annotations


class EngineError(Exception):
    """Generation failed inside the engine; the engine itself can keep serving."""


class EngineOutOfMemoryError(EngineError):
    """The device ran out of memory for this batch; smaller or fewer images may still fit."""


class EngineRequestError(EngineError):
    """The engine refused this request's parameters (e.g. a size its pipeline cannot make)."""


class LoRAStackError(EngineRequestError):
    """The engine cannot apply these LoRA adapters together (a request's `lora`); the message,
    one line, names them and says why."""


class EngineDiedError(EngineError):
    """The engine or its worker died: nothing more can be generated until a restart."""


class LoRAAdapterError(ValueError):
    """A LoRA adapter cannot be served: the message, one line, starts with `prefix(name)` and
    gives `reason`, which never quotes the adapter's files."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{self.prefix(name)} cannot be served: {reason}.")
        self.name = name
        self.reason = reason

    @staticmethod
    def prefix(name: str) -> str:
        return f"LoRA adapter '{name}'"

    @classmethod
    def not_enabled(cls, name: str) -> LoRAAdapterError:
        return cls(name, "LoRA is not enabled on this server (start it with --enable-lora)")

    @classmethod
    def is_about(cls, message: str, name: str) -> bool:
        """Whether `message` (this error's, passed on as text) refuses adapter `name`."""
        return message.startswith(cls.prefix(name))


class LoRAAdapterUnavailableError(EngineError):
    """An adapter loaded earlier cannot be used now: it left host memory (`--max-cpu-loras`)
    and its files could not be read again as an adapter that fits (gone, unreadable, changed).
    Its own requests fail with this until its files are back or it is loaded again; the
    engine serves every other model and adapter meanwhile."""

    def __init__(self, cause: LoRAAdapterError) -> None:
        super().__init__(
            f"{LoRAAdapterError.prefix(cause.name)} is not available: it was read again from "
            f"its lora_path and cannot be served now ({cause.reason}). Load it again "
            "(/v1/load_lora_adapter, load_inplace) or unload it."
        )
        self.name = cause.name


class EngineNotReadyError(RuntimeError):
    """The model is not loaded (yet, or any more)."""


class EngineUnavailableError(RuntimeError):
    """The requested engine cannot serve this model on this machine (a start-up error)."""


class AdmissionError(Exception):
    """Base of admission's refusals and failures (`client.py`, and an engine's own refusals)."""


class RequestTooLargeError(AdmissionError):
    """The request asks for more images than the queue holds at once: it can never fit."""

    def __init__(self, num_images: int, max_queue_images: int) -> None:
        super().__init__(
            f"{num_images} images are more than this server queues at once ({max_queue_images})."
        )
        self.num_images = num_images
        self.max_queue_images = max_queue_images


class RequestOverBudgetError(AdmissionError):
    """The request's images alone are more pixels than the engine holds in flight
    (`memory_budget.py`): it can never run. The message says the largest `n` and size that fit;
    `parameter` names the field to change."""

    def __init__(
        self,
        num_images: int,
        size: tuple[int, int],
        budget: int,
        *,
        fitting_n: int,
        fitting_size: tuple[int, int] | None,
    ) -> None:
        width, height = size
        asked = f"{num_images} images of {width}x{height} are" if num_images > 1 else "one "
        if num_images == 1:
            asked += f"{width}x{height} image is"
        fits = []
        if num_images > 1 and fitting_n >= 1:
            fits.append(f"n={fitting_n} at {width}x{height}")
        if fitting_size is not None:
            fits.append(
                f"n={num_images} at up to {fitting_size[0]}x{fitting_size[1]}"
                if num_images > 1
                else f"a size of up to {fitting_size[0]}x{fitting_size[1]}"
            )
        super().__init__(
            f"{asked} {num_images * width * height} pixels, more than this server generates "
            f"at once within its memory ({budget} pixels, its --image-max-pixels-in-flight). "
            + (f"What fits: {' or '.join(fits)}." if fits else "Ask for fewer or smaller images.")
        )
        self.num_images = num_images
        self.budget = budget
        self.parameter = "n" if num_images > 1 and fitting_n >= 1 else "size"


class QueueFullError(AdmissionError):
    """Too many images are waiting; the client may retry after `retry_after_s`."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"Too many images are waiting; retry after {retry_after_s:.1f} s.")
        self.retry_after_s = retry_after_s


class RequestTimeoutError(AdmissionError):
    """The request waited and ran longer than `request_timeout_s`."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"The request did not finish within {timeout_s:g} s.")
        self.timeout_s = timeout_s


class EngineClosedError(AdmissionError):
    """The engine is shutting down and takes or finishes no more work."""

    def __init__(self) -> None:
        super().__init__("The image server is shutting down; it takes no more requests.")


class EngineHungError(AdmissionError):
    """Work asked to stop still ran `grace_s` later: requests fail until it returns."""

    def __init__(self, grace_s: float) -> None:
        super().__init__(
            f"The image engine is not responding: a call did not stop {grace_s:g} s after its "
            "requests timed out or went away. Requests fail until it returns; retry later."
        )
        self.grace_s = grace_s


class GenerationCancelled(Exception):  # noqa: N818 - a control-flow signal, not a failure
    """Work stopped because no request wants it any more (or it was aborted): a signal."""


def may_be_one_requests(error: BaseException) -> bool:
    """Whether a failed engine call of several requests may have failed for one of them alone,
    so that each runs again alone (docs/architecture.md, "Faults"): any exception but out of
    memory (retried in halves instead), a cancellation, and the whole engine's failures (dead,
    hung, closed, not ready), which no retry can cure."""
    whole_engine = (
        EngineOutOfMemoryError,
        EngineDiedError,
        EngineNotReadyError,
        AdmissionError,
        GenerationCancelled,
    )
    return isinstance(error, Exception) and not isinstance(error, whole_engine)
