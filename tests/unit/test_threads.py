"""models.threads: results and exceptions come back, and the thread is gone afterwards."""

from __future__ import annotations

import asyncio
import threading

import pytest

from models.threads import run_in_fresh_thread, run_in_fresh_thread_async


def test_result_exception_and_a_thread_that_ends():
    seen = []

    def work(x):
        seen.append(threading.current_thread())
        return x * 2

    assert run_in_fresh_thread(work, 21) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError, match="nope"):
        run_in_fresh_thread(lambda: {}["nope"])


def test_async_variant_does_not_block_the_loop():
    async def main():
        started = threading.Event()
        release = threading.Event()

        def work():
            started.set()
            release.wait(5)
            return threading.current_thread()

        task = asyncio.ensure_future(run_in_fresh_thread_async(work, name="t-load"))
        while not started.is_set():
            await asyncio.sleep(0.01)  # the loop keeps running while the thread works
        release.set()
        t = await task
        assert t.name == "t-load"
        t.join(5)
        assert not t.is_alive()

        def fail():
            raise ValueError("bad")

        with pytest.raises(ValueError, match="bad"):
            await run_in_fresh_thread_async(fail)

    asyncio.run(main())
