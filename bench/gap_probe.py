"""The scheduling gap a CPU-bound pass inflicts on a task sharing its CPU.

``GapProbe(cpu)`` forks a process pinned to ``cpu`` that sleeps 1 ms in a loop and keeps
the largest time between two of its wake-ups. Run the pass pinned to the same CPU
(``pinned(cpu)``): on a kernel without full preemption, a system call the pass makes
holds the CPU until it returns, and the probe's largest gap is that hold (plus its 1 ms
sleep and scheduling noise).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from typing import Iterator


def _probe(cpu: int, worst: "mp.sharedctypes.Synchronized[float]", stop: "mp.synchronize.Event",
           ready: "mp.synchronize.Event") -> None:
    os.sched_setaffinity(0, {cpu})
    ready.set()
    last = time.perf_counter()
    while not stop.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        if now - last > worst.value:
            worst.value = now - last
        last = now


class GapProbe:
    def __init__(self, cpu: int) -> None:
        ctx = mp.get_context("fork")
        self.cpu = cpu
        self._worst = ctx.Value("d", 0.0, lock=False)
        self._stop = ctx.Event()
        ready = ctx.Event()
        self._proc = ctx.Process(target=_probe, args=(cpu, self._worst, self._stop, ready), daemon=True)
        self._proc.start()
        ready.wait(5)
        time.sleep(0.05)

    def measure(self, fn):  # type: ignore[no-untyped-def]
        """Run ``fn`` pinned to the probe's CPU; returns (its result, seconds, the probe's worst gap)."""
        with pinned(self.cpu):
            time.sleep(0.01)
            self._worst.value = 0.0
            t = time.perf_counter()
            out = fn()
            took = time.perf_counter() - t
            time.sleep(0.005)            # let the probe record the gap that ends now
            return out, took, self._worst.value

    def close(self) -> None:
        self._stop.set()
        self._proc.join(5)

    def __enter__(self) -> "GapProbe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
