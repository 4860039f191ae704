"""The installed `mptcp-proxy transparent` command on the operator lab's proxy node."""

from __future__ import annotations

import os
import re
import signal

import pytest

from mptcp_proxy.lab import Lab, PathSpec
from mptcp_proxy.lab.traffic import SinkServer, timed_upload
from tests.integration.test_transparent import kernel_state
from tests.support.proc import CliProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

PORT = 9000


@pytest.fixture
def lab():
    with Lab.create([PathSpec(rate_mbit=20), PathSpec(rate_mbit=20)],
                    topology="operator") as lab:
        yield lab


def start(lab: Lab, *args: str) -> CliProcess:
    proc = CliProcess(["transparent", "--ports", str(PORT), *args],
                      prefix=["ip", "netns", "exec", lab.proxy.ns])
    proc.wait_for("transparent: ready")
    return proc


def test_announce_aggregate_log_and_clean_exit(lab):
    before = kernel_state(lab.proxy)
    sink = SinkServer(lab.server, lab.server_addr, PORT)
    proc = start(lab, "--announce", lab.proxy_public_addr,
                 "--announce", f"[{lab.proxy_public_addr6}]:7002")
    try:
        assert kernel_state(lab.proxy) != before
        result = timed_upload(lab, (lab.server_addr, PORT), 2.0, seed=11)
        assert result.verified and result.mptcp
        assert result.paths_used(min_share=0.25) == 2, result.path_bytes
        out = proc.wait_for("reason=done")
        line = next(l for l in out.splitlines() if " conn=" in l)
        assert "mode=transparent" in line
        assert f"client={lab.paths[0].client_addr}:" in line
        assert f"target={lab.server_addr}:{PORT}" in line
        assert "client_side=mptcp" in line and "upstream_side=fallback" in line
        assert int(re.search(r"client_subflows=(\d+)", line).group(1)) >= 2
        assert f"bytes_up={result.sent}" in line
    finally:
        proc.signal(signal.SIGTERM)
        rc = proc.wait()
        sink.close()
    assert rc == 0, proc.output
    assert "kernel state restored" in proc.output
    assert kernel_state(lab.proxy) == before


def test_restart_after_sigkill_leaves_nothing_stale(lab):
    before = kernel_state(lab.proxy)
    proc = start(lab, "--announce", lab.proxy_public_addr)
    proc.proc.kill()
    proc.wait()
    dirty = kernel_state(lab.proxy)
    assert "mptcp_proxy_transparent" in dirty["nft"] and dirty["c_bit"] == "0"
    assert "port 7002" in dirty["endpoints"]
    proc = start(lab, "--announce", lab.proxy_public_addr)
    try:
        out = proc.wait_for("ready")
        assert "did not clean up; restoring" in out
        state = kernel_state(lab.proxy)
        # One of everything, not two.
        assert state["nft"].count("table inet mptcp_proxy_transparent") == 1
        assert state["rules4"].count("fwmark") == 1 and state["rules6"].count("fwmark") == 1
        assert state["endpoints"].count("port 7002") == 1
    finally:
        proc.signal(signal.SIGTERM)
        rc = proc.wait()
    assert rc == 0, proc.output
    assert kernel_state(lab.proxy) == before


def test_second_instance_in_a_namespace_is_refused(lab):
    before = kernel_state(lab.proxy)
    first = start(lab)
    try:
        during = kernel_state(lab.proxy)
        second = CliProcess(["transparent", "--tproxy-port", "7101"],
                            prefix=["ip", "netns", "exec", lab.proxy.ns])
        assert second.wait() == 1
        assert "another transparent proxy runs in this network namespace" in second.output
        assert kernel_state(lab.proxy) == during
    finally:
        first.signal(signal.SIGTERM)
        assert first.wait() == 0
    assert kernel_state(lab.proxy) == before


def test_bad_options_are_usage_errors_before_touching_anything():
    proc = CliProcess(["transparent", "--ports", "80-"])
    assert proc.wait() == 2
    assert "configuration error: --ports" in proc.output
    proc = CliProcess(["transparent", "--announce", "proxy.example"])
    assert proc.wait() == 2
    assert "--announce" in proc.output
