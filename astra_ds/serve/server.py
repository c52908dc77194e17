"""`astra-ds serve`: a finished run answering HTTP requests, to put behind a load balancer.

FastAPI on uvicorn (ASGI, one process, one event loop): the event loop parses, checks and answers requests while
the model works on one worker thread (batcher.py), so health checks and metrics answer during a batch.

    POST /v1/predict  {"texts": [...], "k": 5}  -> labels (ids, names, scores) of each text, as model.predict
    POST /v1/encode   {"texts": [...]}          -> the texts' query embeddings
    GET  /v1/model                              -> the model card, its run directory, version and index
    POST /v1/reload   {"run_dir": "..."} or {}  -> load, verify and warm a run, then swap it in (also SIGHUP)
    GET  /healthz  /readyz  /metrics             -> alive; model loaded; Prometheus text format

The server listens at once and loads the model in the background (/readyz answers 503 until it is loaded).
A reload loads the new model beside the old one, which serves until the swap: requests never wait for a load,
batches in flight finish on the model they started with, and a reload that fails leaves the old model serving
and says why. SIGTERM (or Ctrl-C) stops accepting connections, answers the requests already received, and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from astra_ds.errors import UserError
from astra_ds.serve.batcher import Batcher, Overloaded
from astra_ds.serve.metrics import ServerMetrics
from astra_ds.inference.xc_model import XCModel
from astra_ds.serve.requests import ClientError, k_of, parse_body, texts_of, unknown_fields
from astra_ds.serve.settings import ServeSettings

log = logging.getLogger("astra_ds")

RETRY_AFTER = {"Retry-After": "1"}


def load_warm(run_dir: str, overrides: list[str], device: str | None) -> XCModel:
    """A run loaded (its digests verified) and warmed: its first forward and search are paid here, not by a
    request."""
    model = XCModel.load(run_dir, overrides, device)
    model.predict(["warm up"], k=1)
    return model


class Served:
    """The model being served, and its replacement by a reload."""

    def __init__(self, settings: ServeSettings, metrics: ServerMetrics, loader):
        self.settings, self.metrics, self.loader = settings, metrics, loader
        self.model: XCModel | None = None
        self.description: dict | None = None
        self.run_dir = settings.run_dir
        self.lock = asyncio.Lock()

    def ready(self) -> XCModel:
        if self.model is None:
            raise ClientError(503, None, "the model is still loading", RETRY_AFTER)
        return self.model

    async def load(self, run_dir: str) -> dict:
        """Loads `run_dir` beside the model being served, then swaps it in; on failure the old one stays."""
        async with self.lock:
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(self.loader, run_dir, self.settings.overrides, self.settings.device)
                description = model.description()
            except Exception:
                self.metrics.reloads.labels("failed").inc()
                raise
            self.model, self.description, self.run_dir = model, description, run_dir
            self.metrics.reloads.labels("ok").inc()
            self.metrics.serving(description)
            log.info("serving %s (version %s, step %d, %d labels, %s search), loaded in %.1f s", run_dir,
                     description["version"][:12], description["step"], description["num_labels"],
                     description["index"], time.perf_counter() - started)
            return description


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ClientError(413, None, f"the body is {length} bytes, at most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ClientError(413, None, f"the body is over {limit} bytes")
    return bytes(body)


CLIENT_GONE = 499  # the client closed its connection before the answer (nginx's status for it)


def error_kind(status: int) -> str:
    return {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 422: "reload_failed",
            CLIENT_GONE: "client_gone", 503: "unavailable"}.get(status, "internal" if status >= 500 else "client")


class Observed:
    """ASGI middleware: each HTTP request's status and latency into the metrics; a bug's exception answered 500 in
    JSON (Starlette's own answer to it closes the connection); a client that hung up counted as such (499), not as
    an error of the server; a request cut off by the end of the drain (--drain-s) answered 503 in JSON and counted.
    Plain ASGI: Starlette's BaseHTTPMiddleware costs a task and a stream per request."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [None]

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except ClientDisconnect:
            status[0] = status[0] or CLIENT_GONE
            log.info("%s %s: the client hung up before its answer", scope["method"], scope["path"])
        except asyncio.CancelledError:  # the drain's time (--drain-s) is over: the server stops now
            self.metrics.cut_off.inc()
            if status[0] is None:
                body = {"error": {"status": 503, "field": None, "message": "the server stopped before answering: "
                                                                           "retry"}}
                await JSONResponse(body, 503, headers=RETRY_AFTER)(scope, receive, observed_send)
        except Exception as err:  # a bug: 500 with its message, on a connection that stays open
            log.exception("%s %s failed", scope["method"], scope["path"])
            if status[0] is not None:  # the response had begun: nothing more can be said on it
                raise
            body = {"error": {"status": 500, "field": None, "message": f"internal error: {err}"}}
            await JSONResponse(body, 500)(scope, receive, observed_send)
        finally:
            answered = status[0] or 500
            self.metrics.answered(scope["path"], answered, time.perf_counter() - started,
                                  error_kind(answered) if answered >= 400 else None)


def build_app(settings: ServeSettings, on_fatal=lambda err: None, loader=load_warm) -> FastAPI:
    """The app; `on_fatal(err)` when the first model cannot be loaded (the server should stop). `loader(run_dir,
    overrides, device)` loads a model (tests wrap load_warm)."""
    metrics = ServerMetrics(settings.max_batch)
    served = Served(settings, metrics, loader)
    batcher = Batcher(settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue, metrics.batched)
    metrics.queue_texts.set_function(lambda: batcher.queued_texts)
    limits = settings.limits

    async def reload_from_signal():
        try:
            await served.load(served.run_dir)
        except Exception as err:  # noqa: BLE001 - the old model goes on serving
            log.error("reload of %s failed, still serving the old model: %s", served.run_dir, err)

    async def first_load():
        try:
            await served.load(settings.run_dir)
        except Exception as err:  # noqa: BLE001 - reported by the command, one line
            on_fatal(err)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        loop = asyncio.get_running_loop()
        loading = loop.create_task(first_load())
        on_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be handled
        if on_main_thread:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_from_signal()))
        yield
        if on_main_thread:
            loop.remove_signal_handler(signal.SIGHUP)
        loading.cancel()
        await batcher.stop()

    app = FastAPI(title="astra_ds", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics

    app.add_middleware(Observed, metrics=metrics)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, err: ClientError):
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return JSONResponse(ClientError(err.status_code, None, str(err.detail)).body(), err.status_code)

    async def submit(model: XCModel, texts: list[str], k: int | None):
        try:
            return await batcher.submit(model, texts, k)
        except Overloaded as err:
            raise ClientError(503, None, f"overloaded: {err}", RETRY_AFTER) from None

    @app.post("/v1/predict")
    async def predict(request: Request):
        body = parse_body(await read_body(request, limits.max_body_bytes), limits)
        unknown_fields(body, {"texts", "k"})
        model = served.ready()
        texts, k = texts_of(body, limits), k_of(body, model.predictable_labels)
        predictions = await submit(model, texts, k)
        return {"predictions": [{"ids": ids.tolist(), "names": names, "scores": scores.tolist()}
                                for ids, names, scores in zip(predictions.ids, predictions.names,
                                                              predictions.scores)]}

    @app.post("/v1/encode")
    async def encode(request: Request):
        body = parse_body(await read_body(request, limits.max_body_bytes), limits)
        unknown_fields(body, {"texts"})
        embeddings = await submit(served.ready(), texts_of(body, limits), None)
        return {"dim": embeddings.shape[1], "embeddings": embeddings.tolist()}

    @app.get("/v1/model")
    async def model_card():
        served.ready()
        return served.description

    @app.post("/v1/reload")
    async def reload(request: Request):
        body = parse_body(await read_body(request, limits.max_body_bytes) or b"{}", limits)
        unknown_fields(body, {"run_dir"})
        run_dir = body.get("run_dir", served.run_dir)
        if not isinstance(run_dir, str) or not run_dir:
            raise ClientError(400, "run_dir", "must be a run directory's path")
        try:
            return {"reloaded": True, "model": await served.load(run_dir)}
        except UserError as err:
            raise ClientError(422, "run_dir", f"not reloaded, still serving the old model: {err}") from None

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        served.ready()
        return {"status": "ready", "version": served.description["version"]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said, or asyncio does not set TCP_NODELAY on the connections (40 ms delayed-ACK stalls a request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def serve(settings: ServeSettings) -> None:
    """Serves until SIGTERM or Ctrl-C (then drains and returns); raises UserError when the model cannot be
    loaded."""
    fatal: list[BaseException] = []
    app = build_app(settings, on_fatal=lambda err: (fatal.append(err), setattr(server, "should_exit", True)))
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=settings.drain_s)
    server = uvicorn.Server(config)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d, loading %s", host, port, Path(settings.run_dir))
    # uvicorn drains on SIGTERM/SIGINT, then restores the handlers it found and raises the signal again: these
    # ignore it, and the command ends normally (exit 0) instead of dying of it
    before = {sig: signal.signal(sig, lambda number, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if fatal:
        err = fatal[0]
        raise err if isinstance(err, UserError) else UserError(f"cannot serve {settings.run_dir}: {err}")
    cut_off = app.state.metrics.requests_cut_off()
    if cut_off:
        log.warning("stopped: %d requests in flight were cut off after --drain-s %g s (answered 503)", cut_off,
                    settings.drain_s)
    else:
        log.info("stopped: the requests in flight were answered")
