"""Micro-batching of concurrent requests onto one blocking model worker.

Owns ``MicroBatcher``: requests from many concurrent RPCs queue up while the model is busy and
are run together in the next call, in a single worker thread, so inference never blocks the
event loop and concurrent small requests share one forward pass (the cheap kind of batching:
no waiting window, the batch is whatever queued during the previous call).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from ets.tasks import cancel_and_wait

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item, Result]):
    items: list[Item]
    future: "asyncio.Future[list[Result]]"


class MicroBatcher(Generic[Item, Result]):
    """Runs ``fn(items) -> results`` (same length, same order) in one worker thread, merging the
    items of requests that arrive while a call is in flight, up to ``max_items`` per call."""

    def __init__(self, fn: Callable[[list[Item]], list[Result]], *, max_items: int, name: str,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self._fn = fn
        self._max_items = max(1, max_items)
        self._queue: asyncio.Queue[_Pending[Item, Result]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._on_batch = on_batch
        self._name = name

    def _ensure_started(self) -> asyncio.Queue[_Pending[Item, Result]]:
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run(self._queue), name=self._name)
        return self._queue

    async def submit(self, items: Sequence[Item]) -> list[Result]:
        """Queue ``items`` and wait for their results (exceptions of the call propagate)."""
        if not items:
            return []
        queue = self._ensure_started()
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(list(items), future))
        return await future

    async def _run(self, queue: asyncio.Queue[_Pending[Item, Result]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            size = len(batch[0].items)
            # Take what queued meanwhile; a request is never split across calls.
            while not queue.empty() and size + len(queue._queue[0].items) <= self._max_items:  # type: ignore[attr-defined]
                nxt = queue.get_nowait()
                batch.append(nxt)
                size += len(nxt.items)
            live = [p for p in batch if not p.future.done()]  # cancelled callers drop out
            if not live:
                continue
            items = [item for p in live for item in p.items]
            if self._on_batch is not None:
                self._on_batch(len(items))
            try:
                results = await loop.run_in_executor(self._executor, self._fn, items)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this call
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            offset = 0
            for p in live:
                n = len(p.items)
                if not p.future.done():
                    p.future.set_result(results[offset: offset + n])
                offset += n

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._executor.shutdown(wait=True, cancel_futures=True)
