"""`tuplet agent`: the node agent systemd runs.

It applies the node configuration (which adopts pinned maps and links left by an
earlier agent and swaps in the programs of this build through the links), runs GC on
its schedule and on datapath signals, serves Prometheus metrics, and then waits:

* SIGHUP: read the configuration again. A bad one is rejected (logged with the key)
  and the running datapath is left as it is; a good one is applied (programs replaced
  through their links, maps reused or resized live) and GC restarts on the new maps.
* SIGTERM / SIGINT: stop GC and the metrics server and exit 0. The datapath stays in
  place (pinned programs and maps keep forwarding and tracking); `tuplet teardown`
  removes it.

Table pressure (:mod:`tuplet.conntrack.pressure`): every GC pass reports each table's fill; a main
table at least 90% full brings the next pass forward. With ``[conntrack] auto_grow``,
a table that stays full (90% after three passes in a row, 95% after one) is grown x2 up
to ``auto_grow_max``: the GC thread decides, the main loop applies (like a reload: GC
stopped, ``apply`` with the table's size overridden, which resizes it live, GC
restarted). While auto_grow is on, every apply uses max(configured, pinned) per main
table, so a reload or a restart never shrinks a grown table.

systemd sees READY=1 once the datapath is applied, RELOADING=1 / READY=1 around a
reload, STOPPING=1 on the way out, and WATCHDOG=1 every half WatchdogSec while the
main loop and the GC thread are alive.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import structlog
from prometheus_client import CollectorRegistry

from tuplet.agent import collector, gc_metrics, http
from tuplet.agent.gcloop import GcLoop
from tuplet.agent.notify import Notifier, watchdog_interval
from tuplet.agent.report import agent_state_path
from tuplet.conntrack import pressure
from tuplet.conntrack.runner import PassReport
from tuplet.core.errors import ConfigError, TupletError
from tuplet.node import apply as node_apply
from tuplet.node import config as configmod
from tuplet.node import sizes

log = structlog.get_logger("tuplet.agent")

DEFAULT_CONFIG = "/etc/tuplet/tuplet.toml"
DEFAULT_PROM_ADDR = ":9962"


class Agent:
    def __init__(self, config_path: str, overrides: Callable[[configmod.NodeConfig], configmod.NodeConfig],
                 prom_addr: str, notify: Callable[..., None] | None = None,
                 node_exporter_compat: bool = True) -> None:
        self.config_path = config_path
        self.node_exporter_compat = node_exporter_compat
        self.overrides = overrides
        self.prom_addr = prom_addr
        self.notify = notify or Notifier()
        self.cfg: configmod.NodeConfig | None = None
        self.gc: GcLoop | None = None
        self.registry = CollectorRegistry()
        self.gc_metrics = gc_metrics.GcMetrics(self.registry)
        self.collector: collector.DatapathCollector | None = None
        self.server: http.MetricsServer | None = None
        self.started = time.time()
        self.reloads = 0
        self.last_reload: dict[str, Any] | None = None
        self.gc_last: dict[str, Any] | None = None
        self.autogrow = pressure.AutoGrow()
        self.evictions = pressure.EvictionEstimate()
        self.evicted_total: dict[str, int] = {}   # estimated LRU evictions per table (`ct stats`)
        self.pressure_last: dict[str, Any] | None = None
        self.grown: list[dict[str, Any]] = []          # tables auto-grow grew, for status
        self._grow_requests: list[pressure.Grow] = []
        self._grow_lock = threading.Lock()
        self._hup = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._state_lock = threading.Lock()   # the main loop and the GC thread both save the state

    # --- configuration ------------------------------------------------------------------------

    def load_config(self) -> configmod.NodeConfig:
        return self.overrides(configmod.load(self.config_path))

    def _apply(self, cfg: configmod.NodeConfig, grow: dict[str, int] | None = None) -> node_apply.ApplyResult:
        """``node_apply.apply`` of cfg; with auto_grow on, no main table below its pinned size;
        ``grow``: tables to make this big."""
        eff = cfg
        if cfg.conntrack.auto_grow:
            eff, kept = sizes.keep_grown(cfg, pressure.pinned_sizes(cfg.pin_root))
            for table, configured, pinned in kept:
                if grow and table in grow:
                    continue
                log.warning("table kept at its pinned size", map=table, configured=configured, pinned=pinned,
                            reason="conntrack.auto_grow is on: a table is never shrunk below its pinned size "
                                   "(auto-grow may have grown it); set auto_grow = false to apply a smaller "
                                   "size")
        if grow:
            eff = sizes.with_sizes(eff, grow)
        return node_apply.apply(eff)

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Apply the configuration and start GC and metrics; raises on any failure."""
        cfg = self.load_config()
        res = self._apply(cfg)
        self.cfg = cfg
        self.autogrow.configure(cfg.conntrack.auto_grow, cfg.conntrack.auto_grow_max)
        log.info("datapath applied", config=self.config_path, pin_root=cfg.pin_root,
                 attachments=len(res.attachments), reused_pins=len(res.reused_pins))
        self.collector = collector.DatapathCollector(cfg.pin_root, node_exporter_compat=self.node_exporter_compat)
        self.registry.register(self.collector)
        self._start_gc(cfg)
        self.server = http.serve(self.prom_addr, self.registry)
        if self.server is not None:
            log.info("metrics served", address=self.server.address)
        self._save_state()
        self.notify("READY=1", f"STATUS=datapath applied from {self.config_path}; "
                               f"{len(res.attachments)} attachment(s)")

    def _start_gc(self, cfg: configmod.NodeConfig) -> None:
        self.gc = GcLoop(cfg.pin_root, cfg.conntrack, on_pass=self._on_gc_pass, on_fail=self.gc_metrics.failed)
        self.gc.start()

    def _stop_gc(self) -> None:
        if self.gc is not None:
            self.gc.stop()

    def _on_gc_pass(self, rep: PassReport) -> None:
        """In the GC thread, after every pass: metrics, evictions, auto-grow decisions."""
        self.gc_metrics.observe(rep)
        r = rep.result
        self.gc_last = {"at": time.time(), "reason": rep.reason, "method": r.method, "deleted": r.deleted,
                        "alive": r.alive, "nat_deleted": r.nat_deleted, "duration_s": r.duration,
                        "interval_s": rep.interval, "passes": self.gc.runner.passes if self.gc and self.gc.runner
                        else 0}
        if rep.reason == "start":
            self.evictions.restart()   # new GC loop: the maps may be new ones
        evicted = self.evictions.observe(r, rep.events_before, rep.events_after)
        self.gc_metrics.evictions(evicted)
        for name, n in evicted.items():
            self.evicted_total[name] = self.evicted_total.get(name, 0) + n
        grows = self.autogrow.observe(rep.fill, pressure.capacities(r))
        if rep.pressure or evicted:
            log.info("table pressure", fill={k: round(v, 4) for k, v in rep.fill.items()},
                     under_pressure=list(rep.pressure), evicted=evicted, next_gc_s=round(rep.interval, 3),
                     auto_grow=self.autogrow.enabled)
        self.pressure_last = {"at": time.time(), "fill": dict(rep.fill), "under_pressure": list(rep.pressure),
                              "auto_grow": self.autogrow.enabled, "auto_grow_max": self.autogrow.ceiling}
        if grows:
            with self._grow_lock:
                self._grow_requests += grows
            self._wake.set()   # the main loop grows them (GC must stop for the apply)
        self._save_state()

    def grow(self) -> bool:
        """Grow the tables the GC thread asked for (main loop only); False if it failed."""
        with self._grow_lock:
            reqs, self._grow_requests = self._grow_requests, []
        if not reqs or self.cfg is None:
            return True
        cfg = self.cfg
        try:
            pinned = pressure.pinned_sizes(cfg.pin_root)
        except TupletError as e:
            log.error("table grow failed", maps=[g.map for g in reqs], error=str(e), datapath="unchanged",
                      retry_after_s=pressure.RETRY_AFTER)
            for g in reqs:
                self.autogrow.finished(g.map, ok=False)
            return False
        todo = []
        for g in reqs:
            if pinned.get(g.map) == g.old_entries and cfg.conntrack.auto_grow:
                todo.append(g)
            else:   # resized (or auto_grow turned off) by a reload since the decision
                self.autogrow.dropped(g.map)
        if not todo:
            return True
        sizes = {g.map: g.new_entries for g in todo}
        self.notify(f"STATUS=growing {', '.join(f'{g.map} {g.old_entries} -> {g.new_entries}' for g in todo)}")
        self._stop_gc()
        try:
            res = self._apply(cfg, grow=sizes)
        except Exception as e:   # the old tables and programs stay: the datapath runs on
            log.error("table grow failed", maps=sizes, error=str(e), error_type=type(e).__name__,
                      datapath="unchanged", retry_after_s=pressure.RETRY_AFTER)
            for g in todo:
                self.autogrow.finished(g.map, ok=False)
            self._start_gc(cfg)
            self._save_state()
            self.notify("STATUS=table grow failed: " + str(e))
            return False
        self._start_gc(cfg)
        resized = {r.map: r for r in res.resized}
        for g in todo:
            self.autogrow.finished(g.map, ok=True)
            r = resized.get(g.map)
            others = [{"map": x.map, "old_entries": x.old_entries, "new_entries": x.new_entries}
                      for x in res.resized if x.map not in sizes]
            log.warning("table grown", map=g.map, old_entries=g.old_entries, new_entries=g.new_entries,
                        fill=round(g.fill, 4), trigger=g.trigger, ceiling=self.autogrow.ceiling,
                        copied=r.copied if r else None, duration_s=r.duration_s if r else None,
                        also_resized=others)
            self.gc_metrics.grown.labels(g.map).inc()
            self.grown = [*self.grown[-19:], {"at": time.time(), "map": g.map, "old_entries": g.old_entries,
                                              "new_entries": g.new_entries, "fill": g.fill,
                                              "trigger": g.trigger}]
        self._save_state()
        self.notify(f"STATUS=grew {', '.join(f'{g.map} to {g.new_entries}' for g in todo)}")
        return True

    def reload(self) -> bool:
        """SIGHUP: apply the configuration again; False (datapath untouched) if it is bad."""
        if self.cfg is None:
            raise TupletError("agent", "reload", detail="the agent has not started")
        try:
            cfg = self.load_config()
            for key in ("pin_root", "netns"):
                if getattr(cfg, key) != getattr(self.cfg, key):
                    raise ConfigError(f"node.{key}", f"cannot change on reload ({getattr(self.cfg, key)!r} -> "
                                                     f"{getattr(cfg, key)!r}); restart the agent")
        except ConfigError as e:
            log.error("reload rejected", config=self.config_path, key=e.key, error=str(e))
            self.last_reload = {"at": time.time(), "ok": False, "error": str(e)}
            self._save_state()
            self.notify("READY=1", f"STATUS=reload rejected: {e}")
            return False
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        self._stop_gc()
        try:
            res = self._apply(cfg)
        except Exception as e:   # anything (a netlink or OS error too): the datapath as it was runs on
            log.error("reload failed", config=self.config_path, error=str(e), error_type=type(e).__name__)
            self.last_reload = {"at": time.time(), "ok": False, "error": str(e)}
            self._start_gc(self.cfg)
            self._save_state()
            self.notify("READY=1", f"STATUS=reload failed: {e}")
            return False
        self.cfg = cfg
        self.autogrow.configure(cfg.conntrack.auto_grow, cfg.conntrack.auto_grow_max)
        self.reloads += 1
        self._start_gc(cfg)
        resized = [dataclasses.asdict(r) for r in res.resized]
        self.last_reload = {"at": time.time(), "ok": True, "resized": resized}
        log.info("reloaded", config=self.config_path, attachments=len(res.attachments), resized=resized)
        self._save_state()
        self.notify("READY=1", f"STATUS=reloaded {self.config_path}")
        return True

    def run(self) -> int:
        """Serve signals until SIGTERM/SIGINT. Call start() first."""
        interval = watchdog_interval()
        while not self._stop.is_set():
            self._wake.wait(timeout=interval if interval else 3600)
            self._wake.clear()
            if self._hup.is_set():
                self._hup.clear()
                self.reload()
            if self._grow_requests and not self._stop.is_set():
                self.grow()
            if interval and not self._stop.is_set() and self.gc is not None and self.gc.alive():
                self.notify("WATCHDOG=1")
        return 0

    def shutdown(self) -> None:
        self.notify("STOPPING=1")
        if self.gc is not None:
            self.gc.stop()
        if self.server is not None:
            self.server.stop()
        agent_state_path(self.cfg.pin_root if self.cfg else "").unlink(missing_ok=True)
        log.info("agent stopped", datapath="left in place (tuplet teardown removes it)")

    def on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._hup.set()
        else:
            self._stop.set()
        self._wake.set()

    def _save_state(self) -> None:
        if self.cfg is None:
            return
        d = {"pid": os.getpid(), "started": self.started, "config": self.config_path, "reloads": self.reloads,
             "last_reload": self.last_reload, "gc": self.gc_last,
             "gc_settings": {"interval": self.cfg.conntrack.gc_interval,
                             "max_interval": self.cfg.conntrack.gc_max_interval},
             "pressure": self.pressure_last, "grown": self.grown, "evicted": self.evicted_total,
             "metrics": self.server.address if self.server else None}
        p = agent_state_path(self.cfg.pin_root)
        with self._state_lock:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(f".tmp.{os.getpid()}")
            tmp.write_text(json.dumps(d, indent=2), encoding="utf-8")
            os.replace(tmp, p)


def run_agent(config_path: str, overrides: Callable[[configmod.NodeConfig], configmod.NodeConfig],
              prom_addr: str, node_exporter_compat: bool = True) -> int:
    """The `tuplet agent` command. Returns the exit status; raises ConfigError for a bad
    configuration on start (the CLI prints it and exits 2)."""
    agent = Agent(config_path, overrides, prom_addr, node_exporter_compat=node_exporter_compat)
    for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, agent.on_signal)
    try:
        agent.start()
    except BaseException:
        agent.notify("STOPPING=1")
        if agent.gc is not None:
            agent.gc.stop()
        if agent.server is not None:
            agent.server.stop()
        raise
    try:
        return agent.run()
    finally:
        agent.shutdown()
