"""A real Prometheus (the Debian ``prometheus`` server) scraping a running ``tuplet agent`` with
prometheus/tuplet-rules.yml: a CT table filled past 75% and 90% through the pinned map raises
the alerts (seen pending, then firing, through /api/v1/alerts and /api/v1/rules); auto-grow
(turned on by a reload) resolves them; every query of dashboards/tuplet-conntrack.json returns
data from the live server, with its template variables substituted as Grafana would (services of
both families programmed for the Services row).

The one change to the rules file: TupletConntrackTableCritical's ``for: 2m`` is ``for: 8s``
here, so that its pending phase is seen and ends within the test (the expression and the
threshold are the file's)."""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from agent_harness import AgentProc
from lxc_harness import tcp
from prom_server import PROMETHEUS, PromServer
from test_autogrow import agent, agent_config, fill_tcp  # noqa: F401  (agent: fixture)
from test_prom import DASHBOARD, _panels
from tuplet.bpf.programs import Program
from tuplet.datapath.abi import CT_MAP_SYN, CT_MAP_TCP, PROGS_DIR
from tuplet.lb import writer as lb
from tuplet.lb.model import Backend, Service, ServiceType

RULES = Path(__file__).resolve().parents[1] / "prometheus" / "tuplet-rules.yml"
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: `make prom-deps` installs it")

POD, PEER = "10.64.0.36", "10.64.0.64"
CRITICAL_FOR = "        for: 2m\n"


def rules_for_test() -> str:
    text = RULES.read_text()
    at = text.index("alert: TupletConntrackTableCritical")
    assert text.index(CRITICAL_FOR, at) < text.index("- alert:", at + 1)
    return text[:at] + text[at:].replace(CRITICAL_FOR, "        for: 8s\n", 1)


def ct_alerts(prom: PromServer, name: str) -> list[dict[str, Any]]:
    return [a for a in prom.alerts().get(name, []) if a["labels"].get("map_name") == CT_MAP_TCP]


def rule_state(prom: PromServer, name: str) -> str:
    for g in prom.api("rules", type="alert")["groups"]:
        for r in g["rules"]:
            if r["name"] == name:
                return str(r["state"])
    raise AssertionError(f"no rule {name}")


def dashboard_queries(instance: str) -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in _panels(dash["panels"]):
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$instance", re.escape(instance).replace("\\", "\\\\"))
            assert "$" not in expr, expr
            out.append((p["title"], expr))
    return out


def traffic(pin_root: str) -> None:
    out = Program.from_pin(f"{pin_root}/{PROGS_DIR}/cil_from_container")
    into = Program.from_pin(f"{pin_root}/{PROGS_DIR}/cil_to_container")
    try:
        for port in range(40000, 40010):
            out.test_run(tcp(POD, port, PEER, 80, "S"))
            into.test_run(tcp(PEER, 80, POD, port, "SA"))
            out.test_run(tcp(POD, port, PEER, 80, "A"))
        bad = bytearray(tcp(POD, 1, PEER, 80, "S"))
        bad[14] = 0x44                        # IHL below 5: DROP_INVALID_L3
        out.test_run(bytes(bad))
        for i in range(1500):                 # the handshake table holds 1024
            out.test_run(tcp(POD, 1024 + i, "10.64.1.1", 443, "S"))
    finally:
        out.close()
        into.close()


@pytest.fixture
def prom_for(request):
    made: list[PromServer] = []

    def start(a: AgentProc) -> PromServer:
        p = PromServer([f"127.0.0.1:{a.port}"], rules_for_test())
        made.append(p)
        return p
    yield start
    for p in made:
        p.close()
        assert not p.dir.exists() and p.proc.poll() is not None


def test_alerts_pending_firing_resolved_and_every_dashboard_query(agent, prom_for, pin_root, tmp_path) -> None:  # noqa: F811
    a = agent(auto_grow=False)
    prom = prom_for(a)
    inst = f"127.0.0.1:{a.port}"
    prom.wait(lambda: prom.query('up{job="tuplet"} == 1'), 30, "the agent scraped")
    prom.wait(lambda: prom.query(f'node_nf_conntrack_entries_limit{{map_name="{CT_MAP_TCP}"}} == 4096'),
              30, "node_nf_conntrack_entries_limit")
    assert rule_state(prom, "TupletConntrackTableHigh") == "inactive"
    assert not ct_alerts(prom, "TupletConntrackTableHigh")

    fill_tcp(pin_root, 3200)                  # 78%: past the mixin's 75%, below 90%
    prom.wait(lambda: [x for x in ct_alerts(prom, "TupletConntrackTableHigh") if x["state"] == "firing"],
              30, "TupletConntrackTableHigh firing")
    assert rule_state(prom, "TupletConntrackTableHigh") == "firing"
    [high] = ct_alerts(prom, "TupletConntrackTableHigh")
    assert float(high["value"]) == pytest.approx(3200 / 4096) and high["labels"]["instance"] == inst
    assert not ct_alerts(prom, "TupletConntrackTableCritical")

    fill_tcp(pin_root, 3800)                  # 93%
    states = []

    def critical_firing() -> bool:
        got = ct_alerts(prom, "TupletConntrackTableCritical")
        if got and (not states or states[-1] != got[0]["state"]):
            states.append(got[0]["state"])
            if got[0]["state"] == "pending":
                assert rule_state(prom, "TupletConntrackTableCritical") == "pending"
        return bool(got) and got[0]["state"] == "firing"
    prom.wait(critical_firing, 40, "TupletConntrackTableCritical pending then firing")
    assert states == ["pending", "firing"]
    assert rule_state(prom, "TupletConntrackTableCritical") == "firing"

    # Packets through the agent's pinned pod programs: connections (forwarded, promoted), a
    # malformed packet (dropped), a SYN burst past the handshake table (LRU evictions).
    traffic(pin_root)
    prom.wait(lambda: prom.query(f'tuplet_datapath_conntrack_evictions_estimated_total{{map_name="{CT_MAP_SYN}"}} > 0'),
              30, "evictions estimated")

    # Auto-grow on by a reload: 3 passes above 90% double the table; both alerts resolve.
    (tmp_path / "tuplet.toml").write_text(agent_config(pin_root, auto_grow=True))
    a.proc.send_signal(signal.SIGHUP)
    a.wait_event("table grown", timeout=30, map=CT_MAP_TCP)
    prom.wait(lambda: not ct_alerts(prom, "TupletConntrackTableHigh")
              and not ct_alerts(prom, "TupletConntrackTableCritical"), 30, "the alerts resolved")
    assert prom.query(f'node_nf_conntrack_entries_limit{{map_name="{CT_MAP_TCP}"}}')[0]["value"][1] == "8192"

    # Services of both families for the Services row: an IPv4 one with a backend, an IPv6 one
    # whose only backend is at weight 0 (draining; no active backend).
    with lb.ServiceTable(pin_root, local_addrs={POD}) as t:
        t.upsert(Service("web", ServiceType.CLUSTER_IP, "10.96.0.10", 80, backends=(Backend(POD, 8080),), source="cli"))
        t.upsert(Service("web6", ServiceType.CLUSTER_IP, "fd00::10", 80, source="cli",
                         backends=(Backend("fd00:10:244::5", 8080, weight=0),)))
    prom.wait(lambda: prom.query('tuplet_service_backends{service="web6", address="[fd00::10]:80", family="ipv6", '
                                 'state="draining"} == 1'), 30, "the IPv6 service scraped")
    assert prom.query('tuplet_services{family="ipv6", type="ClusterIP"} == 1')
    assert prom.query('tuplet_backends{family="ipv4", state="active", location="local"} == 1')

    # Grafana's instance variable, from its own query; then every panel's query.
    assert prom.api("label/instance/values", **{"match[]": "tuplet_bpf_map_capacity"}) == [inst]
    queries = dashboard_queries(inst)   # Grafana escapes a regex variable: \\. in the PromQL string
    assert len(queries) >= 20
    grown = prom.query(f'increase(tuplet_conntrack_auto_grow_total{{map_name="{CT_MAP_TCP}"}}[1m])')
    assert float(grown[0]["value"][1]) > 0        # the first grow counted (the series starts at 0)
    empty = [(title, expr) for title, expr in queries if not prom.query(expr)]
    assert not empty, "\n".join(f"{t}: {e}" for t, e in empty)
