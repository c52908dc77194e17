"""`astra-ds serve`: a finished run answering HTTP requests (astra_ds/serve/)."""

from __future__ import annotations

import os

from astra_ds.cli.arguments import finished_run, run_command
from astra_ds.errors import ConfigError
from astra_ds.libraries import quiet_libraries
from astra_ds.serve.requests import Limits
from astra_ds.serve.settings import ServeSettings


def cmd_serve(args) -> None:
    for name in ("max_batch", "max_queue", "max_texts", "max_chars", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    if args.max_wait_ms < 0 or args.drain_s < 0:
        raise ConfigError("--max-wait-ms and --drain-s must be >= 0")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, not {args.port}")
    finished_run(args.run_dir)
    # torch's OpenMP threads sleep between batches instead of spinning on the cores the event loop answers on
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    quiet_libraries()
    from astra_ds.serve.server import serve

    serve(ServeSettings(args.run_dir, args.host, args.port, args.max_batch, args.max_wait_ms, args.max_queue,
                        Limits(args.max_texts, args.max_chars, args.max_body_bytes), args.set, args.device,
                        args.drain_s))


def add_commands(commands) -> None:
    serve = run_command(
        commands, "serve", cmd_serve, "answer HTTP requests with a trained run (batched, reloadable)",
        "An HTTP server (FastAPI on uvicorn) over a finished run: POST /v1/predict {\"texts\": [...], \"k\": 5}, "
        "POST /v1/encode, GET /v1/model, POST /v1/reload (also SIGHUP), GET /healthz, /readyz, /metrics "
        "(Prometheus). Concurrent requests are batched into one encoder forward. SIGTERM answers the requests in "
        "flight, then exits 0. It listens on loopback unless --host says otherwise: put it behind a proxy that "
        "does not expose /v1/reload.")
    defaults, limits = ServeSettings(run_dir=""), Limits()
    serve.add_argument("--host", default=defaults.host,
                       help=f"address to listen on (default {defaults.host}; 0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=defaults.port,
                       help=f"port (default {defaults.port}; 0: any free one, logged)")
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch,
                       help=f"texts a model batch (default {defaults.max_batch})")
    serve.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                       help=f"how long a request may wait for others to batch with while the model is idle (default "
                            f"{defaults.max_wait_ms:g}: batches form from the requests that arrive while the model "
                            "works)")
    serve.add_argument("--max-queue", type=int, default=defaults.max_queue,
                       help=f"texts waiting for the model; more are answered 503 with Retry-After (default "
                            f"{defaults.max_queue})")
    serve.add_argument("--max-texts", type=int, default=limits.max_texts,
                       help=f"texts a request (default {limits.max_texts}; more: 413)")
    serve.add_argument("--max-chars", type=int, default=limits.max_chars,
                       help=f"characters a text (default {limits.max_chars}; more: 413)")
    serve.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes,
                       help=f"bytes a request body (default {limits.max_body_bytes >> 20} MiB)")
    serve.add_argument("--drain-s", type=float, default=defaults.drain_s,
                       help=f"on SIGTERM, the longest to wait for the requests in flight (default {defaults.drain_s:g})")
    serve.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
