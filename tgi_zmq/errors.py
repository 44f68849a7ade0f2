"""The errors a request can end with, in TGI's shape: an HTTP status, an ``error_type`` and a message.

Every process that refuses or fails a request raises or builds one of these; it travels to the frontend
as an ``ErrorOutput`` (``RequestError.output``, ``generation_error``, ``internal_error``) and the
frontend answers with ``request_error(output)`` as it is. TGI's parameter rules are in
``tgi_zmq.validation``; when a failure fails one request and when it stops a process is the error
policy of ``tgi_zmq.runtime`` (``isolated``, ``BrokenInvariant``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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


def internal_error(rid: str, where: str, exc: BaseException) -> ErrorOutput:
    """Our own fault while handling one request (a bug, not the client's input): a 500 ``internal``
    that fails this request alone. Clients get the exception's type; its text and traceback are in
    ``where``'s log (they may name files)."""
    return ErrorOutput(rid, f"Internal error in the {where} ({type(exc).__name__})", "internal", 500)


class BrokenInvariant(Exception):
    """The state a process shares between requests is wrong: going on could give wrong answers, so
    the process exits (and is restarted) even inside a request's handler (``tgi_zmq.runtime``)."""


Fail = Callable[[str, Exception], None]  # fails one request (its rid) with the exception that broke it


@contextlib.contextmanager
def isolated(rid: str, fail: Fail) -> Iterator[None]:
    """Run one request's share of some work: an exception fails that request alone (``fail(rid, exc)``)
    and the caller goes on with the next request, unless it is a ``BrokenInvariant``."""
    try:
        yield
    except BrokenInvariant:
        raise
    except Exception as exc:
        fail(rid, exc)
