"""The frontend's shared state, reachable from every handler."""

from __future__ import annotations

import dataclasses
from importlib import metadata

from aiohttp import web

from tgi_zmq.config import ServerConfig

from .health import Health, expected_processes
from .jobs import Admission
from .pipeline import Pipeline

try:
    VERSION = metadata.version("tgi-zmq")
except metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0.1.0"

SYSTEM_FINGERPRINT = f"{VERSION}-native"


@dataclasses.dataclass
class Frontend:
    config: ServerConfig
    health: Health
    pipeline: Pipeline
    admission: Admission
    draining: bool = False  # set on SIGTERM: /health and new work get 503 until the process exits

    @classmethod
    def create(cls, config: ServerConfig) -> Frontend:
        health = Health(expected_processes(config))
        return cls(config, health, Pipeline(config, health), Admission(config.max_concurrent_requests))

    @property
    def compute_type(self) -> str:
        return "cpu" if self.config.device == "cpu" else "gpu+optimized"


FRONTEND = web.AppKey("frontend", Frontend)


def frontend(request: web.Request) -> Frontend:
    return request.app[FRONTEND]


def rid_of(request: web.Request) -> str:
    """The request's internal id (unique, set by the app's middleware)."""
    return request["rid"]


def client_id_of(request: web.Request) -> str | None:
    """The client's own ``x-request-id``, echoed back and logged but never used as our rid."""
    return request.headers.get("x-request-id")
