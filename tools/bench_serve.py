"""`astra-ds serve` under load, beside its limit measured in the same run: in-process `model.predict`.

Starts the server on a free loopback port, then for each concurrency (1, 8, 64 by default) sends one-text
requests from that many concurrent clients (keep-alive connections) until --requests are answered or --duration
seconds have passed, whichever comes first: queries/s, p50/p99 latency and errors. In-process, the same texts:
`model.predict([text])` one at a time (the single-query time) and in batches of --batch (the batched
throughput). Then a reload (POST /v1/reload) in the middle of a concurrency-8 load: requests failed. First, the
start-up of `astra-ds predict --text` against `python -c "import torch, transformers"`. Loopback only, bounded
in requests and time.

    python tools/bench_serve.py --run-dir runs/synthetic
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np

import astra_ds
from astra_ds.data.readers import read_dataset


def in_process(model, texts: list[str], batch: int, k: int) -> tuple[float, float]:
    """(median seconds of predict([text]), texts a second of predict on batches of `batch`)."""
    model.predict(texts[:batch], k)  # warm
    singles = []
    for text in texts[:200]:
        started = time.perf_counter()
        model.predict([text], k)
        singles.append(time.perf_counter() - started)
    started = time.perf_counter()
    done = 0
    for start in range(0, min(len(texts), 20 * batch), batch):
        done += len(model.predict(texts[start:start + batch], k).ids)
    return float(np.median(singles)), done / (time.perf_counter() - started)


def median_seconds(command: list[str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def start_server(run_dir: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "astra_ds", "serve", "--run-dir", run_dir, "--port", "0", *extra],
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = server.stderr.readline()
        if match := re.search(r"listening on (http://\S+),", line):
            url = match.group(1)
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # drain its log
            break
        if not line and server.poll() is not None:
            raise SystemExit(f"the server ended: rc {server.returncode}")
    else:
        raise SystemExit("the server did not start within 120 s")
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the model did not load within 120 s")


class Connection:
    """A keep-alive HTTP/1.1 connection on asyncio streams: the load generator's client, light enough that the
    server, not the client, is what is measured on the same cores."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> "Connection":
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        body = json.dumps(payload).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def load(url: str, texts: list[str], concurrency: int, requests: int, duration: float, k: int,
               reload_after: float | None = None) -> dict:
    latencies, errors, sent = [], 0, 0
    deadline = time.perf_counter() + duration

    async def worker():
        nonlocal errors, sent
        connection = await Connection.open(url)
        try:
            while sent < requests and time.perf_counter() < deadline:
                text = texts[sent % len(texts)]
                sent += 1
                started = time.perf_counter()
                try:
                    status, _ = await connection.post("/v1/predict", {"texts": [text], "k": k})
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status = 0
                    connection.close()
                    connection = await Connection.open(url)
                latencies.append(time.perf_counter() - started)
                errors += status != 200
        finally:
            connection.close()

    async def reload():
        await asyncio.sleep(reload_after)
        connection = await Connection.open(url)
        status, _ = await connection.post("/v1/reload", {})
        connection.close()
        return status

    started = time.perf_counter()
    tasks = [worker() for _ in range(concurrency)] + ([reload()] if reload_after is not None else [])
    outcomes = await asyncio.gather(*tasks)
    seconds = time.perf_counter() - started
    return {"queries/s": len(latencies) / seconds, "p50 ms": np.percentile(latencies, 50) * 1e3,
            "p99 ms": np.percentile(latencies, 99) * 1e3, "requests": len(latencies), "errors": errors,
            "reload": outcomes[-1] if reload_after is not None else None}


def batched_texts(url: str) -> tuple[float, float]:
    """(texts, model batches) so far, from the server's metrics."""
    text = httpx.get(f"{url}/metrics").text
    return tuple(float(re.search(rf"^astra_ds_batch_texts_{name} (\S+)$", text, re.M).group(1))
                 for name in ("sum", "count"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a finished run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=1000, help="requests at each concurrency, at most")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds at each concurrency, at most")
    parser.add_argument("--batch", type=int, default=64, help="the in-process batch (and the server's max batch)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra `astra-ds serve` argument")
    args = parser.parse_args()

    imports_s = median_seconds([sys.executable, "-c", "import torch, transformers"])
    predict_s = median_seconds([sys.executable, "-m", "astra_ds", "predict", "--run-dir", args.run_dir, "--text",
                                "a text to tag"])
    print(f"start-up: `astra-ds predict --text` {predict_s:.2f} s, `python -c 'import torch, transformers'` "
          f"{imports_s:.2f} s: {predict_s / imports_s:.2f}x (medians of 3)")
    model = astra_ds.load(args.run_dir)
    texts = read_dataset(model.cfg.data.path).test.texts
    single_s, batched_qps = in_process(model, texts, args.batch, args.k)
    del model
    print(f"in-process: predict([text]) median {single_s * 1e3:.1f} ms; batches of {args.batch}: "
          f"{batched_qps:.1f} queries/s")

    server, url = start_server(args.run_dir, ["--max-batch", str(args.batch), *args.serve_arg])
    try:
        print("| concurrency | queries/s | vs in-process batched | p50 ms | vs in-process single | p99 ms | "
              "texts a batch | requests | errors |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for concurrency in args.concurrency:
            asyncio.run(load(url, texts, concurrency, min(50, args.requests), 5, args.k))  # warm the connections
            texts_before, batches_before = batched_texts(url)
            row = asyncio.run(load(url, texts, concurrency, args.requests, args.duration, args.k))
            texts_after, batches_after = batched_texts(url)
            print(f"| {concurrency} | {row['queries/s']:.1f} | {row['queries/s'] / batched_qps:.2f} | "
                  f"{row['p50 ms']:.1f} | {row['p50 ms'] / (single_s * 1e3):.2f} | {row['p99 ms']:.1f} | "
                  f"{(texts_after - texts_before) / max(batches_after - batches_before, 1):.1f} | "
                  f"{row['requests']} | {row['errors']} |", flush=True)
        row = asyncio.run(load(url, texts, 8, args.requests, args.duration, args.k, reload_after=1.0))
        print(f"reload under load (concurrency 8): reload answered {row['reload']}, {row['requests']} requests, "
              f"{row['errors']} failed, p99 {row['p99 ms']:.1f} ms")
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(60)
    print(f"server exit status after SIGTERM: {server.returncode}")


if __name__ == "__main__":
    main()
