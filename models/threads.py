"""Run a model's load and warm-up in a thread that exits afterwards.

torch's CPU kernels parallelise with OpenMP, and OpenMP (libgomp) keeps a pool of worker threads for every thread
that has run a parallel region, for as long as that thread lives. When the pools together hold more threads than
there are CPUs, libgomp stops spinning between parallel regions and parks its workers instead, so every one of the
hundreds of small parallel regions of a decode step pays a wake-up. Measured on a 2-core box (2026-11-30, torch
2.13): decode at batch 1 ran at 81 tok/s on a thread that was the only OpenMP user and at 35 tok/s on an engine
thread while the thread that had loaded the model was still alive. Loading in a fresh thread that exits leaves the
engine thread the only OpenMP user of its model.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[..., T], *args: Any, name: str = "jetserve-load") -> T:
    """fn(*args) on a new thread that ends when fn returns (its OpenMP pool with it); returns or raises as fn."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


async def run_in_fresh_thread_async(fn: Callable[..., T], *args: Any, name: str = "jetserve-load") -> T:
    """`run_in_fresh_thread` without blocking the event loop: awaits the thread's result."""
    loop = asyncio.get_running_loop()
    fut: "asyncio.Future[T]" = loop.create_future()

    def done(result: Any = None, error: BaseException = None) -> None:
        if fut.cancelled():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as e:
            loop.call_soon_threadsafe(done, None, e)
        else:
            loop.call_soon_threadsafe(done, result)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await fut
