"""vLLM's and SGLang's ``POST /start_profile`` and ``POST /stop_profile``: torch.profiler over the
workers' steps (``tgi_zmq.profiling``). Off unless the service runs with ``--profile-dir``: a 404 in
TGI's error shape otherwise. Both send a ``ProfileRequest`` down the pipeline; ``/stop_profile`` then
waits (at most ``STOP_WAIT_S``) for every worker's trace to appear and lists them."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from aiohttp import web

from tgi_zmq.errors import RequestError
from tgi_zmq.messages import ProfileRequest
from tgi_zmq.profiling import new_traces

from .http import frontend, json_response, rid_of

log = logging.getLogger("tgi_zmq.frontend")

STOP_WAIT_S = 10.0  # how long /stop_profile waits for the traces (a long recording takes longer to write)
POLL_S = 0.1


def _profile_dir(request: web.Request) -> str:
    directory = frontend(request).config.profile_dir
    if directory is None:
        raise RequestError(
            "profiling is off: start the server with --profile-dir DIR", error_type="not_found", status=404
        )
    return directory


async def start_profile(request: web.Request) -> web.Response:
    """Every worker starts recording its steps at its next step boundary."""
    directory = _profile_dir(request)
    frontend(request).pipeline.post(ProfileRequest("start", directory))
    log.info("rid=%s profiling started: traces go to %s", rid_of(request), directory)
    return json_response({"directory": directory, "traces": []})


async def stop_profile(request: web.Request) -> web.Response:
    """Every worker stops and writes its trace; the answer lists those written within ``STOP_WAIT_S``."""
    directory, fe = _profile_dir(request), frontend(request)
    since = time.time()
    fe.pipeline.post(ProfileRequest("stop", directory))
    traces = await wait_for_traces(Path(directory), since, fe.config.num_shard, STOP_WAIT_S)
    log.info("rid=%s profiling stopped: %d trace(s) in %s", rid_of(request), len(traces), directory)
    return json_response({"directory": directory, "traces": [str(path) for path in traces]})


async def wait_for_traces(directory: Path, since: float, count: int, timeout: float) -> list[Path]:
    """The traces written since ``since``, once there are ``count`` of them or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while len(traces := new_traces(directory, since)) < count and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
    return traces
