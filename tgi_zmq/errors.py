"""The errors a request can end with, in TGI's shape: an HTTP status, an ``error_type`` and a message.

Every process that refuses or fails a request raises or builds one of these; it travels to the frontend
as an ``ErrorOutput`` (``RequestError.output``, ``generation_error``) and the frontend answers with
``request_error(output)`` as it is. TGI's parameter rules are in ``tgi_zmq.validation``.
"""

from __future__ import annotations

from tgi_zmq.messages import ErrorOutput

VALIDATION_PREFIX = "Input validation error: "
GENERATION_PREFIX = "Request failed during generation: "


class RequestError(Exception):
    """A request refused with an HTTP ``status`` and a TGI ``error_type``; ``str(exc)`` is the message."""

    def __init__(self, message: str, *, error_type: str = "validation", status: int = 422) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status = status

    @property
    def error(self) -> str:
        """The text of the response's ``error`` field."""
        return str(self)

    def output(self, rid: str) -> ErrorOutput:
        """This error as an ``ErrorOutput``: how a process hands it to the frontend's request."""
        return ErrorOutput(rid, self.error, self.error_type, self.status)


class ValidationError(RequestError):
    """TGI's 422 validation error; ``str(exc)`` is the text after "Input validation error: "."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_type="validation", status=422)

    @property
    def error(self) -> str:
        return VALIDATION_PREFIX + str(self)


def generation_error(rid: str, reason: str) -> ErrorOutput:
    """TGI's 424 for a request the pipeline failed to finish (``reason`` is fit for clients)."""
    return ErrorOutput(rid, GENERATION_PREFIX + reason, "generation", 424)


def request_error(output: ErrorOutput) -> RequestError:
    """The HTTP error for an ``ErrorOutput`` (its message is final: built by the helpers above)."""
    return RequestError(output.message, error_type=output.error_type, status=output.status)
