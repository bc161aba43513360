"""Running GC passes over time: on the schedule, and early when the datapath signals.

The runner waits on two things at once: the time the schedule says the next pass is
due, and the datapath's signal ring buffer. A CT_FILL_UP signal (a conntrack insert
failed) asks for an early pass, which the schedule rate-limits. Every pass feeds its
result back to the schedule (the adaptive interval, and the pressure rule: a main table
at least 90% full brings the next pass forward, see :mod:`tuplet.conntrack.schedule`) and to
``on_pass``. ``probe`` (optional) is read just before and just after each pass (the
datapath's conntrack event counters, for :class:`tuplet.conntrack.pressure.EvictionEstimate`).
"""
from __future__ import annotations

import select
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import structlog

from tuplet.conntrack import pressure
from tuplet.conntrack.gc import CtGc, GcResult
from tuplet.conntrack.schedule import delete_ratio
from tuplet.datapath.signals import SignalReader

log = structlog.get_logger("tuplet.gc")

#: Longest single wait, so a stop request is noticed promptly.
MAX_WAIT = 1.0


class Schedule(Protocol):
    def next_due(self, last_pass: float) -> float: ...
    def after_pass(self, ratio: float, pressure_freed: float | None = None) -> float: ...
    def request_early(self, now: float) -> bool: ...

    @property
    def pressured(self) -> bool: ...


@dataclass(frozen=True)
class PassReport:
    reason: str          # "interval", "early", "pressure" or "start"
    result: GcResult
    interval: float      # the interval the schedule chose after this pass
    ratio: float = 0.0   # the pass's delete ratio (largest deleted / max_entries of a map)
    fill: Mapping[str, float] = field(default_factory=dict)   # entries / max_entries per table
    pressure: tuple[str, ...] = ()                            # main tables >= 90% full
    events_before: Mapping[str, int] | None = None            # the probe's counters around the pass
    events_after: Mapping[str, int] | None = None


class GcRunner:
    def __init__(self, gc: CtGc, schedule: Schedule, signals: SignalReader | None = None,
                 on_pass: Callable[[PassReport], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, max_wait: float = MAX_WAIT,
                 probe: Callable[[], Mapping[str, int]] | None = None,
                 before_pass: Callable[[], None] | None = None) -> None:
        self.gc = gc
        self.before_pass = before_pass   # e.g. the agent swapping in maps `apply` replaced
        self.schedule = schedule
        self.signals = signals
        self.on_pass = on_pass
        self.probe = probe
        self.clock = clock
        self.max_wait = max_wait
        self.last_pass = clock()
        self.passes = 0

    def _read_probe(self) -> Mapping[str, int] | None:
        if self.probe is None:
            return None
        try:
            return self.probe()
        except Exception as e:   # counters are a nicety: the pass runs without them
            log.warning("gc: cannot read the datapath's conntrack counters", error=str(e))
            return None

    def run_pass(self, reason: str) -> PassReport:
        if self.before_pass is not None:
            self.before_pass()
        before = self._read_probe()
        res = self.gc.run()
        after = self._read_probe() if before is not None else None
        ratio = delete_ratio((m.deleted, m.max_entries) for m in res.maps)
        fill = res.fill()
        hot = tuple(pressure.under_pressure(fill))
        interval = self.schedule.after_pass(ratio, pressure.freed(res, hot) if hot else None)
        self.last_pass = self.clock()
        self.passes += 1
        report = PassReport(reason, res, interval, ratio, fill, hot, before, after)
        log.info("gc scheduled pass", reason=reason, deleted=res.deleted, alive=res.alive,
                 delete_ratio=round(ratio, 6), duration_s=round(res.duration, 4),
                 next_interval_s=round(interval, 3), pressure=list(hot))
        if self.on_pass:
            self.on_pass(report)
        return report

    def step(self) -> PassReport | None:
        """Wait (at most ``max_wait``) for the next reason to collect; run the pass if there is one."""
        now = self.clock()
        due = self.schedule.next_due(self.last_pass)
        timeout = min(max(due - now, 0.0), self.max_wait)
        if self.signals is not None:
            ready, _, _ = select.select([self.signals], [], [], timeout)
            if ready:
                sigs = self.signals.poll(0)
                fill_ups = [s for s in sigs if s.kind == "CT_FILL_UP"]
                if fill_ups:
                    log.info("datapath signal", kind="CT_FILL_UP",
                             tables=sorted({str(s.arg) for s in fill_ups}), count=len(fill_ups))
                    if self.schedule.request_early(self.clock()):
                        return self.run_pass("early")
        elif timeout > 0:
            time.sleep(timeout)
        if self.clock() >= self.schedule.next_due(self.last_pass):
            return self.run_pass("pressure" if self.schedule.pressured else "interval")
        return None

    def serve(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set."""
        while not stop.is_set():
            self.step()
