"""Dynamic batching for the server: the requests that arrive together are answered by one encoder forward and
one top-k search per distinct k.

A request waits in the queue while the model works on the batch before it; when the model is free the next
batch takes the queued requests in arrival order up to `max_batch` texts, after waiting at most `max_wait_s`
for more while fewer are queued. Under load, batches therefore fill without any waiting; alone, a request pays at
most `max_wait_s`. The model runs on one worker thread, off the event loop, so that health checks, metrics and
new requests are answered while it works. A request holds the model it was checked against (its k within that
model's labels): a batch holds requests of one model, and a reload swaps the model for the requests after it,
never under one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from astra_ds.inference.xc_model import Predictions


class Overloaded(Exception):
    """The queue holds `max_queue` texts already: the client should retry later."""


@dataclass
class Job:
    model: object  # the model the request was checked against, and is answered by
    texts: list[str]
    k: int | None  # None: the embeddings only
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


def answer(model, jobs: list[Job]) -> list:
    """Each job's result, computed together: its Predictions (k given) or its (n, d) embeddings."""
    texts = [text for job in jobs for text in job.texts]
    queries, calibration = model.encode_tokens(model.tokenize(texts))
    starts = np.cumsum([0] + [len(job.texts) for job in jobs])
    results: list = [queries[starts[i]:starts[i + 1]].numpy() for i in range(len(jobs))]
    for k in sorted({job.k for job in jobs if job.k is not None}):
        mine = [i for i, job in enumerate(jobs) if job.k == k]
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in mine])
        ranked = model.rank(queries[rows], calibration, k)
        for i, begin in zip(mine, np.cumsum([0] + [len(jobs[i].texts) for i in mine])):
            end = begin + len(jobs[i].texts)
            results[i] = Predictions(ranked.ids[begin:end], ranked.scores[begin:end], ranked.names[begin:end])
    return results


class Batcher:
    def __init__(self, max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[int], None] = lambda texts: None):
        """`on_batch(texts)` after each batch."""
        self.max_batch, self.max_wait_s, self.max_queue, self.on_batch = max_batch, max_wait_s, max_queue, on_batch
        self.jobs: deque[Job] = deque()
        self.queued_texts = 0
        self.arrived = asyncio.Event()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="astra-ds-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """After the last request is answered (the server drains first)."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.worker.shutdown(wait=True)

    async def submit(self, model, texts: list[str], k: int | None):
        """`texts` answered by `model`: their Predictions (k given) or embeddings."""
        if self.queued_texts + len(texts) > self.max_queue:
            raise Overloaded(f"{self.queued_texts} texts are queued (at most {self.max_queue})")
        job = Job(model, texts, k, asyncio.get_running_loop().create_future())
        self.jobs.append(job)
        self.queued_texts += len(texts)
        self.arrived.set()
        return await job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            deadline = self.jobs[0].queued_at + self.max_wait_s
            while self.queued_texts < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            try:
                results = await loop.run_in_executor(self.worker, answer, batch[0].model, batch)
            except Exception as err:  # noqa: BLE001 - the requests of the batch fail, the server goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
            else:
                for job, result in zip(batch, results):
                    if not job.future.done():  # its client may have gone
                        job.future.set_result(result)
            self.on_batch(sum(len(job.texts) for job in batch))

    def _take(self) -> list[Job]:
        """The queued jobs of one model in arrival order up to max_batch texts (at least one job, never split)."""
        batch = [self.jobs.popleft()]
        texts = len(batch[0].texts)
        while self.jobs and texts + len(self.jobs[0].texts) <= self.max_batch and self.jobs[0].model is batch[0].model:
            texts += len(self.jobs[0].texts)
            batch.append(self.jobs.popleft())
        self.queued_texts -= texts
        if self.jobs:  # the next batch is waiting already
            self.arrived.set()
        else:
            self.arrived.clear()
        return batch
