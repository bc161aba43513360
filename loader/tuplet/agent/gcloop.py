"""The agent's GC thread: one :class:`~tuplet.conntrack.runner.GcRunner` over the pinned
CT and NAT maps, its schedule, the datapath's signal ring and event counters; rebuilt on
every (re)load."""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from tuplet.bpf.maps import Map
from tuplet.conntrack.gc import CtGc
from tuplet.conntrack.notify import NOTIFY_MAPS
from tuplet.conntrack.runner import GcRunner, PassReport
from tuplet.conntrack.schedule import GcSchedule
from tuplet.core.errors import TupletError
from tuplet.datapath import abi, cttables, paths
from tuplet.datapath import events as ct_events
from tuplet.datapath.abi import SIGNAL_MAP
from tuplet.datapath.signals import SignalReader
from tuplet.node import config as configmod

log = structlog.get_logger("tuplet.agent")

#: Seconds ``stop`` waits for the GC thread.
STOP_TIMEOUT = 30.0


@dataclass
class GcLoop:
    """GC over the pinned CT maps in a thread; rebuilt on every (re)load."""

    pin_root: str
    cfg: configmod.Conntrack
    on_pass: Callable[[PassReport], None]
    on_fail: Callable[[], None] | None = None
    thread: threading.Thread | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    runner: GcRunner | None = None
    error: BaseException | None = None
    _closers: list[Any] = field(default_factory=list)
    _ids: dict[str, int] = field(default_factory=dict)
    _gc_maps: list[Map] = field(default_factory=list)

    def _open_gc(self) -> tuple[CtGc, list[Map]]:
        ct = [paths.open_pinned(self.pin_root, n) for n in cttables.NAMES if paths.is_pinned(self.pin_root, n)]
        nat = [paths.open_pinned(self.pin_root, n) for n in cttables.NAT_NAMES if paths.is_pinned(self.pin_root, n)]
        maps = ct + nat
        notify = [paths.open_pinned(self.pin_root, n) for n in NOTIFY_MAPS] \
            if all(paths.is_pinned(self.pin_root, n) for n in NOTIFY_MAPS) else []
        return CtGc(ct, nat=nat, count_nat=True, notify_maps=notify), maps + notify

    def _pinned_ids(self) -> dict[str, int]:
        out = {}
        for n in (*cttables.NAMES, *cttables.NAT_NAMES):
            with contextlib.suppress(TupletError):
                with Map.from_pin(os.path.join(self.pin_root, n)) as m:
                    out[n] = m.info.id
        return out

    def _follow_pins(self) -> None:
        """Before every pass: a pinned table replaced under the agent (`tuplet apply`
        resized it) is collected from now on, not the unpinned old one."""
        now = self._pinned_ids()
        if now == self._ids or self.runner is None:
            return
        changed = sorted(n for n in now if self._ids.get(n) != now[n])
        gc, maps = self._open_gc()
        old_gc, old_maps = self.runner.gc, self._gc_maps
        self.runner.gc, self._gc_maps, self._ids = gc, maps, now
        old_gc.close()
        for m in old_maps:
            m.close()
        log.warning("gc: pinned map replaced, collecting the new one", maps=changed)

    def start(self) -> None:
        self._ids = self._pinned_ids()
        gc, self._gc_maps = self._open_gc()
        obj = str(paths.object_dir() / abi.OBJ_LXC)
        reader = None
        if os.path.exists(os.path.join(self.pin_root, SIGNAL_MAP)):
            ring = self._keep(paths.open_pinned(self.pin_root, SIGNAL_MAP))
            reader = self._keep(SignalReader(ring, obj))
        probe = None
        if os.path.exists(os.path.join(self.pin_root, abi.EVENTS_MAP)):
            try:
                names = ct_events.event_names(obj)
                events = self._keep(paths.open_pinned(self.pin_root, abi.EVENTS_MAP))
                probe = lambda: ct_events.read(events, names)   # noqa: E731
            except (TupletError, OSError, KeyError, ValueError) as e:
                log.warning("gc: no conntrack event counters, evictions not estimated", error=str(e))
        schedule = GcSchedule(fixed=self.cfg.gc_interval, maximum=self.cfg.gc_max_interval)
        self.runner = GcRunner(gc, schedule, signals=reader, on_pass=self.on_pass, probe=probe,
                               before_pass=self._follow_pins)
        self.thread = threading.Thread(target=self._run, name="tuplet-gc", daemon=True)
        self.thread.start()

    def _keep(self, obj: Any) -> Any:
        self._closers.append(obj)
        return obj

    def _run(self) -> None:
        if self.runner is None:
            return
        try:
            self.runner.run_pass("start")
            self.runner.serve(self.stop_event)
        except BaseException as e:   # reported by alive() and the main loop
            self.error = e
            log.error("gc stopped", error=str(e), error_type=type(e).__name__)
            if self.on_fail is not None:
                self.on_fail()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop the thread, then close what it used. A thread still running after ``timeout``
        (a pass in the middle of a syscall) keeps its fds: closing them under it would let the
        next open reuse the numbers, and the pass would act on another map. False then."""
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=timeout)
            if self.thread.is_alive():
                log.error("gc thread did not stop; its maps stay open", timeout_s=timeout,
                          open=len(self._closers) + len(self._gc_maps))
                self._closers, self._gc_maps = [], []   # the thread may still use them: leak rather than reuse
                return False
        if self.runner is not None:
            self.runner.gc.close()
        for m in self._gc_maps:
            m.close()
        self._gc_maps = []
        for obj in reversed(self._closers):
            obj.__exit__(None, None, None) if hasattr(obj, "__exit__") else obj.close()
        self._closers.clear()
        return True
