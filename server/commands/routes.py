"""The headwise HTTP surface next to vLLM's: ``/v1/headwise/plan``, ``/v1/headwise/stats``, metrics.

``HeadwiseRoutes`` is an ASGI middleware that ``headwise serve`` hands to vLLM with
``--middleware headwise.server.commands.routes.HeadwiseRoutes`` (any ``vllm serve`` can use it the same
way). vLLM builds its FastAPI app itself, so the middleware waits for the first ASGI event (the
lifespan start-up, before any request) and then, once:

* adds ``router`` to vLLM's app. The routes sit *inside* vLLM's middleware stack, so ``--api-key``
  guards them like every other ``/v1`` path and vLLM's error handlers format their errors;
* registers ``HeadwiseCollector`` in the Prometheus registry that vLLM's ``/metrics`` serves, so
  one scrape returns ``vllm:*`` and ``headwise_*`` series;
* when the lifespan start-up completes, waits until the listening socket accepts connections and
  logs one line with the URL: the moment clients can connect.

Everything the routes need arrives through the environment that ``headwise serve`` (or the
plugin's ``enable_env``) sets: ``HEADWISE_ENABLE``, ``HEADWISE_PLAN``, ``HEADWISE_STATS_DIR``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from headwise.server import env
from .logline import say
from headwise.server.plugin.stats import HeadwiseCollector, read_stats, stats_dir_from_env

router = APIRouter(prefix="/v1/headwise", tags=["headwise"])
READY_WAIT_S = 60.0  # how long the ready line waits for the socket after the app started


def _active_plan_path() -> str | None:
    return env.plan_path() if env.enabled() else None


def _error(status: int, message: str, kind: str) -> JSONResponse:
    """The OpenAI error shape vLLM uses for its own errors."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


_OFF = "headwise attention is off on this server (started with --no-headwise, or without HEADWISE_ENABLE=1)"

_plan_cache: dict[tuple[str, float], object] = {}


def _load_plan(path: str):
    """The plan at ``path``, re-read only when the file changes (requests stay cheap)."""
    from headwise.patterns.plan import load_plan

    key = (path, Path(path).stat().st_mtime)
    if key not in _plan_cache:
        _plan_cache.clear()
        _plan_cache[key] = load_plan(path)
    return _plan_cache[key]


def _max_model_len(request: Request) -> int | None:
    config = getattr(request.app.state, "vllm_config", None)
    return getattr(getattr(config, "model_config", None), "max_model_len", None)


FALLBACK_MAX_LENGTH = 8192  # the plan route's bound when the app carries no vLLM config (tests)


@router.get("/plan")
async def get_plan(request: Request, length: int | None = Query(
        None, description="sequence length the expected densities are computed at, "
                          "1..the server's max-model-len (default: the max-model-len)")):
    """The active plan: per-layer patterns and the densities expected at ``length`` tokens.

    The answer costs the same at every ``length`` (closed-form densities, summaries cached per
    length); ``length`` must still be one this server can serve, so a typo gets a 400 that says so.
    """
    limit = _max_model_len(request) or FALLBACK_MAX_LENGTH
    if length is not None and not 1 <= length <= limit:
        return _error(400, f"length={length}: expected a sequence length in 1..{limit} tokens "
                           f"(this server's max-model-len is {limit})", "BadRequestError")
    path = _active_plan_path()
    if path is None:
        return _error(404, _OFF, "NotFoundError")
    plan = _load_plan(path)
    length = length or limit
    layers = [dataclasses.asdict(row) for row in plan.summary(length)]
    return {
        "object": "headwise.plan",
        "plan": path,
        "description": plan.description,
        "model": plan.model.model_dump(mode="json"),
        "settings": plan.settings.model_dump(mode="json"),
        "length": length,
        "expected_density": {
            "prefill": plan.expected_density(length),
            "decode": plan.expected_decode_density(length),
        },
        "layers": layers,
    }


@router.get("/stats")
async def get_stats():
    """What the backend did since start: achieved density, sparse vs dense-fallback counts, time.
    A stock server answers too when it profiles (``HEADWISE_PROFILE=1``: stock attention's timings)."""
    if _active_plan_path() is None and not env.profile():
        return _error(404, _OFF, "NotFoundError")
    return {"object": "headwise.stats", **read_stats(stats_dir_from_env())}


# ------------------------------------------------------------------------ wiring into vLLM
_collector_registered = False
# Set when vLLM's engine died without being asked to stop (vLLM's watchdog then stops the HTTP
# server); ``launch.run_launch`` turns it into a non-zero exit with this reason.
engine_failure: str | None = None
ENGINE_POLL_S = 0.25  # how often the engine watch looks at the engine client
ORPHAN_GRACE_S = 2.0  # after the engine stopped: how long a request may still take to end by itself


class _EngineWatch:
    """Ends the HTTP requests that can no longer end by themselves once vLLM's engine has stopped.

    On SIGTERM vLLM 0.32 aborts the engine client (``--shutdown-timeout 0``) and then waits for every
    HTTP connection to close, but a stream whose request was aborted that way never gets another
    output: it hangs, and the server with it (seen: in-flight streams held the API server until it
    was killed). Every HTTP request runs as a task this watch knows; once the engine client is
    stopped or dead, the requests still running after ``ORPHAN_GRACE_S`` are cancelled (the client
    sees the connection end before the response completed). It also tells a requested stop (vLLM
    called ``engine_client.shutdown``) from an engine that died by itself.
    """

    def __init__(self) -> None:
        self.requests: set[asyncio.Task] = set()
        self.stopping = False  # vLLM was asked to shut the engine down
        self.task: asyncio.Task | None = None

    def start(self, app) -> None:
        engine = getattr(app.state, "engine_client", None)
        if engine is None or self.task is not None:
            return
        shutdown = engine.shutdown

        def requested_shutdown(*args, **kwargs):
            self.stopping = True
            return shutdown(*args, **kwargs)

        engine.shutdown = requested_shutdown  # vLLM's SIGTERM handler looks it up when it runs
        self.task = asyncio.get_running_loop().create_task(self._watch(engine))

    async def _watch(self, engine) -> None:
        global engine_failure
        while not self._stopped(engine):
            await asyncio.sleep(ENGINE_POLL_S)
        if not self.stopping:
            engine_failure = ("vLLM's engine core died (its process exited or failed); the API server stopped "
                              "because it can no longer serve. The engine's own log lines above say why")
        await asyncio.sleep(ORPHAN_GRACE_S)
        for task in list(self.requests):
            task.cancel()

    def _stopped(self, engine) -> bool:
        resources = getattr(getattr(engine, "engine_core", None), "resources", None)
        return bool(getattr(resources, "engine_dead", False) or getattr(engine, "errored", False))


_watch = _EngineWatch()


def register_collector() -> None:
    """Put the headwise series into the registry vLLM's ``/metrics`` serves; once per process.

    A single API server (the default) serves ``prometheus_client.REGISTRY``. With several API
    server processes vLLM reads a multiprocess directory instead, which a custom collector cannot
    join; the headwise series are then missing from ``/metrics`` (``/v1/headwise/stats`` has them).
    """
    global _collector_registered
    if _collector_registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(HeadwiseCollector(stats_dir_from_env()))
    _collector_registered = True


def _listen_target(app) -> tuple[str, int, str, bool] | None:
    """(host to connect to, port, URL to print, listening on every interface) from vLLM's parsed
    args; None for unix sockets."""
    args = getattr(app.state, "args", None)
    port = getattr(args, "port", None)
    if args is None or port is None or getattr(args, "uds", None):
        return None
    host = getattr(args, "host", None) or ""
    scheme = "https" if getattr(args, "ssl_keyfile", None) and getattr(args, "ssl_certfile", None) else "http"
    connect = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
    shown = f"[{connect}]" if ":" in connect else connect
    return connect, int(port), f"{scheme}://{shown}:{port}", host in ("", "0.0.0.0", "::")


async def _announce_when_listening(app) -> None:
    target = _listen_target(app)
    if target is None:
        say("ready (unix socket)")
        return
    host, port, url, everywhere = target
    deadline = time.monotonic() + READY_WAIT_S
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        break
    else:
        say(f"the app started but nothing accepted connections on {host}:{port} within {READY_WAIT_S:.0f}s")
        return
    plan = _active_plan_path()
    if plan is None:
        attention = "stock vLLM attention"
    else:
        stats = read_stats(stats_dir_from_env())
        if stats["backend_active"]:
            attention = f"headwise attention ({len(stats['workers'])} worker(s)), plan {plan}"
        else:  # the silent-fallback trap: say it loudly
            attention = (f"WARNING: headwise was asked for (plan {plan}) but no headwise worker has "
                         "reported; the engine may be running stock attention")
    where = " (listening on all interfaces)" if everywhere else ""
    say(f"ready at {url}{where}  (OpenAI API {url}/v1, health {url}/health, metrics {url}/metrics, "
        f"plan {url}/v1/headwise/plan); {attention}")


class HeadwiseRoutes:
    """ASGI middleware that attaches the headwise routes and metrics to vLLM's app (see module doc)."""

    def __init__(self, app) -> None:
        self.app = app
        self._attached = False
        self._tasks: set[asyncio.Task] = set()  # keeps the announcement task referenced

    def _attach(self, fastapi_app) -> None:
        fastapi_app.include_router(router)
        register_collector()
        self._attached = True

    async def __call__(self, scope, receive, send) -> None:
        if not self._attached and scope.get("app") is not None:
            self._attach(scope["app"])
        if scope["type"] == "http":
            task = asyncio.current_task()
            _watch.requests.add(task)
            try:
                await self.app(scope, receive, send)
            except asyncio.CancelledError:
                if _watch.task is None or not _watch.task.done():
                    raise  # not the watch's: uvicorn's own cancellation
            finally:
                _watch.requests.discard(task)
            return
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        fastapi_app = scope.get("app")

        async def watch_startup(message) -> None:
            await send(message)
            if message.get("type") == "lifespan.startup.complete" and fastapi_app is not None:
                task = asyncio.get_running_loop().create_task(_announce_when_listening(fastapi_app))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                _watch.start(fastapi_app)

        await self.app(scope, receive, watch_startup)
