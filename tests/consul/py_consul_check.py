#!/usr/bin/env python3
"""Drives a Muster node's Consul-compatible API with the real `py-consul` client
(PyPI package py-consul, `import consul`), asserting as it goes.

Usage: py_consul_check.py HOST:PORT [PEERS [CA_FILE]]

HOST:PORT is a node's HTTP address; PEERS, when given, is the number of voters
/v1/status/peers must list; CA_FILE, when given, makes the client speak HTTPS and
trust that CA (a node started with --tls-cert). Exits 0 when every step held; any failed assertion or
client error ends it non-zero with a traceback. Run by tests/consul.rs.
"""

import sys
import threading
import time

import consul
from consul.exceptions import BadRequest


def step(name):
    print(f"py-consul: {name}", flush=True)


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    peers = int(sys.argv[2]) if len(sys.argv) > 2 else None
    if len(sys.argv) > 3:
        c = consul.Consul(host=host, port=int(port), scheme="https", verify=sys.argv[3])
    else:
        c = consul.Consul(host=host, port=int(port))
    svc, sid = "pyweb", "pyweb-1"
    check_id = f"service:{sid}"

    step("register with a TTL check (lowercase keys, a `checks` list)")
    assert c.agent.service.register(
        svc,
        service_id=sid,
        address="127.0.0.1",
        port=8080,
        tags=["py", "v1"],
        meta={"lang": "python"},
        check=consul.Check.ttl("10s"),
    )

    step("a new TTL check starts critical")
    index, nodes = c.health.service(svc)
    assert int(index) > 0, index
    assert len(nodes) == 1, nodes
    assert nodes[0]["Service"]["ID"] == sid, nodes
    assert [ch["Status"] for ch in nodes[0]["Checks"]] == ["critical"], nodes
    _, passing = c.health.service(svc, passing=True)
    assert passing == [], passing

    step("a blocking query on the service returns when the check passes")
    result = {}

    def block():
        result["answer"] = c.health.service(svc, index=index, wait="30s", passing=True)

    waiter = threading.Thread(target=block)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), "the blocking query returned before anything changed"
    assert c.agent.check.ttl_pass(check_id, notes="all good")
    waiter.join(15)
    assert not waiter.is_alive(), "the blocking query did not return after the change"
    new_index, nodes = result["answer"]
    assert int(new_index) > int(index), (new_index, index)
    assert len(nodes) == 1, nodes
    assert nodes[0]["Checks"][0]["Status"] == "passing", nodes
    assert nodes[0]["Checks"][0]["Output"] == "all good", nodes

    step("catalog")
    _, services = c.catalog.services()
    assert svc in services and sorted(services[svc]) == ["py", "v1"], services
    cat_index, entries = c.catalog.service(svc)
    assert len(entries) == 1, entries
    e = entries[0]
    assert (e["ServiceID"], e["ServiceName"], e["ServicePort"], e["ServiceAddress"]) == (
        sid,
        svc,
        8080,
        "127.0.0.1",
    ), e
    assert e["ServiceMeta"] == {"lang": "python"}, e

    step("a blocking query with nothing changing returns after its wait with the same index")
    started = time.monotonic()
    same_index, _ = c.catalog.service(svc, index=cat_index, wait="1s")
    elapsed = time.monotonic() - started
    assert same_index == cat_index, (same_index, cat_index)
    assert 0.9 <= elapsed < 10, elapsed

    step("tag filters: several tags mean all of them")
    _, both = c.health.service(svc, tag=["py", "v1"])
    assert len(both) == 1, both
    _, none = c.health.service(svc, tag=["py", "nope"])
    assert none == [], none

    step("health checks, agent services and checks")
    _, checks = c.health.checks(svc)
    assert [ch["CheckID"] for ch in checks] == [check_id], checks
    agent_services = c.agent.services()
    assert agent_services[sid]["Service"] == svc, agent_services
    agent_checks = c.agent.checks()
    assert agent_checks[check_id]["Status"] == "passing", agent_checks

    step("warn and fail")
    assert c.agent.check.ttl_warn(check_id, notes="slow")
    assert c.agent.checks()[check_id]["Status"] == "warning"
    assert c.agent.check.ttl_fail(check_id, notes="down")
    check = c.agent.checks()[check_id]
    assert (check["Status"], check["Output"]) == ("critical", "down"), check

    step("maintenance: a critical check of its own until it ends")
    assert c.agent.check.ttl_pass(check_id, notes="back")
    _, passing = c.health.service(svc, passing=True)
    assert len(passing) == 1, passing
    assert c.agent.service.maintenance(sid, True, reason="kernel upgrade")
    _, passing = c.health.service(svc, passing=True)
    assert passing == [], passing
    maint_id = f"_service_maintenance:{sid}"
    check = c.agent.checks()[maint_id]
    assert (check["Status"], check["Notes"], check["ServiceID"]) == ("critical", "kernel upgrade", sid), check
    try:
        c.agent.check.ttl_pass(maint_id)
        raise AssertionError("a report on the maintenance check was accepted")
    except BadRequest as e:
        assert "maintenance" in str(e), e
    assert c.agent.service.maintenance(sid, False)
    assert maint_id not in c.agent.checks()
    _, passing = c.health.service(svc, passing=True)
    assert len(passing) == 1, passing
    assert c.agent.check.ttl_fail(check_id, notes="down")

    step("datacenters and nodes")
    assert c.catalog.datacenters() == ["dc1"], c.catalog.datacenters()
    _, nodes = c.catalog.nodes()
    assert "127.0.0.1" in [n["Node"] for n in nodes], nodes
    _, node = c.catalog.node("127.0.0.1")
    assert sid in node["Services"], node
    _, node_checks = c.health.node("127.0.0.1")
    assert check_id in [ch["CheckID"] for ch in node_checks], node_checks

    step("checks by state, across services")
    _, critical = c.health.state("critical")
    assert check_id in [ch["CheckID"] for ch in critical], critical
    assert all(ch["Status"] == "critical" for ch in critical), critical
    _, passing = c.health.state("passing")
    assert check_id not in [ch["CheckID"] for ch in passing], passing
    _, anything = c.health.state("any")
    assert check_id in [ch["CheckID"] for ch in anything], anything

    step("status and agent self")
    leader = c.status.leader()
    assert isinstance(leader, str) and ":" in leader, leader
    if peers is not None:
        assert len(c.status.peers()) == peers, c.status.peers()
    me = c.agent.self()
    assert me["Config"]["Datacenter"] == "dc1", me

    step("bad input is a 400 naming the field")
    try:
        c.agent.service.register("Not_A_DNS_Label", service_id="x", address="127.0.0.1", port=80)
        raise AssertionError("an invalid service name was accepted")
    except BadRequest as e:
        assert "Name" in str(e), e

    step("deregister")
    assert c.agent.service.deregister(sid)
    _, nodes = c.health.service(svc)
    assert nodes == [], nodes
    assert sid not in c.agent.services()

    print("py-consul: all checks passed", flush=True)


if __name__ == "__main__":
    main()
