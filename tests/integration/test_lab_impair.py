"""Path delay and loss in the lab, for real: the NFQUEUE emulator in the kernel's path.

Round trips are measured with TCP connects (one SYN, one SYN-ACK) and TCP_INFO;
loss with numbered UDP datagrams whose order is checked too; every transfer
compares SHA-256 on the far side; multipath is proven with per-link counters.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

import pytest

from mptcp_proxy.errors import LabError
from mptcp_proxy.lab import Lab, Node, PathSpec, impair, netns, remove_lab, topology
from mptcp_proxy.lab.nfqueue import NfqueueError
from mptcp_proxy.observe.sockinfo import mptcp_info, tcp_info
from tests.support.traffic import (
    Thread, connect, listener, payload, recv_until_eof, send_all_and_shut, sha256,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

MB = 1_000_000
SO_RCVBUFFORCE = 33
SEQ = struct.Struct("!I")
DATAGRAM = 64


def goodput(rate_mbit: float) -> float:
    """TCP goodput of a tbf rate (layer-2 bytes: 1448 payload bytes per 1514)."""
    return rate_mbit * 1448 / 1514


def connect_times_ms(lab: Lab, source: str, dest: str, count: int = 10) -> list[float]:
    """Time ``count`` TCP connects from ``source`` (a client path address) to ``dest``."""
    with lab.server.enter():
        srv = listener(dest)
    times = []
    with srv:
        for _ in range(count):
            with lab.client.enter():
                family = socket.AF_INET6 if ":" in dest else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
            with sock:
                sock.settimeout(5)
                sock.bind((source, 0))
                start = time.monotonic()
                sock.connect(srv.getsockname()[:2])
                times.append((time.monotonic() - start) * 1000)
            srv.accept()[0].close()
    return times


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def transfer(src: Node, dst: Node, dst_addr: str, size: int, *, mptcp: bool = False,
             source: str | None = None, seed: int = 0) -> tuple[float, socket.socket | None]:
    """Send ``size`` bytes from ``src`` to ``dst_addr`` in ``dst``; verify the SHA-256.

    Returns the seconds it took and TCP_INFO / MPTCP_INFO read just before the close.
    """
    data = payload(size, seed)
    with dst.enter():
        srv = listener(dst_addr, mptcp=mptcp)

    def receive() -> tuple[str, int]:
        srv.settimeout(30)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(60)
            return recv_until_eof(conn)

    with srv:
        receiver = Thread(receive, name="impair-receiver")
        receiver.start()
        with src.enter():
            cli = connect(srv.getsockname()[:2], mptcp=mptcp, timeout=60, source=source)
        with cli:
            start = time.monotonic()
            send_all_and_shut(cli, data, shut=False)
            info = mptcp_info(cli) if mptcp else tcp_info(cli)
            cli.shutdown(socket.SHUT_WR)
            digest, count = receiver.join_result(90)
            seconds = time.monotonic() - start
    assert count == size
    assert digest == sha256(data)
    return seconds, info


def udp_burst(src: Node, src_addr: str, dst: Node, dst_addr: str, count: int,
              pps: float) -> tuple[list[int], float]:
    """Send ``count`` numbered datagrams at up to ``pps``.

    Returns the numbers that arrived, in arrival order, and the seconds from the
    first send to the last arrival.
    """
    family = socket.AF_INET6 if ":" in dst_addr else socket.AF_INET
    with dst.enter():
        rx = socket.socket(family, socket.SOCK_DGRAM)
    with src.enter():
        tx = socket.socket(family, socket.SOCK_DGRAM)
    with rx, tx:
        rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        rx.bind((dst_addr, 0))
        tx.bind((src_addr, 0))
        tx.connect(rx.getsockname()[:2])
        # Resolve neighbours first, so nothing waits on ARP below; the path may
        # lose a warm-up datagram too.
        rx.settimeout(0.2)
        for _ in range(20):
            tx.send(b"warm-up")
            try:
                rx.recv(64)
                break
            except (TimeoutError, socket.timeout):
                continue
        else:
            raise AssertionError("no warm-up datagram arrived in 20 tries")
        got: list[int] = []
        last = [0.0]

        def receive() -> None:
            rx.settimeout(0.5)  # far longer than the path's delay or a pause of the sender
            try:
                while True:
                    data = rx.recv(2048)
                    if len(data) == DATAGRAM:  # not a late warm-up
                        got.append(SEQ.unpack_from(data)[0])
                        last[0] = time.monotonic()
            except (TimeoutError, socket.timeout):
                pass

        receiver = Thread(receive, name="udp-receiver")
        receiver.start()
        start = time.monotonic()
        for i in range(count):
            lag = start + i / pps - time.monotonic()
            if lag > 0.001:
                time.sleep(lag)
            tx.send(SEQ.pack(i) + bytes(DATAGRAM - SEQ.size))
        receiver.join_result(30)
    return got, max(last[0] - start, 1e-9)


# --------------------------------------------------------------------------
# Delay
# --------------------------------------------------------------------------

def test_each_path_adds_twice_its_one_way_delay_to_a_round_trip():
    with Lab.create([PathSpec(delay_ms=20), PathSpec(delay_ms=5), PathSpec()]) as lab:
        medians = {}
        for a in lab.paths:
            medians[a.index] = statistics.median(
                connect_times_ms(lab, a.client_addr, lab.server_addr))
        # IPv6 too: neighbour discovery crosses the queues like everything else.
        medians["v6"] = statistics.median(
            connect_times_ms(lab, lab.paths[0].client_addr6, lab.server_addr6, count=5))
        print("connect RTT medians, ms: " + ", ".join(f"{k}={v:.2f}" for k, v in medians.items()))
        assert 40 <= medians[0] <= 50
        assert 40 <= medians["v6"] <= 50
        assert 10 <= medians[1] <= 15
        assert medians[2] < 2            # the unimpaired path gets no queue at all
        # The kernel's own RTT estimate agrees.
        _, info = transfer(lab.client, lab.server, lab.server_addr, 256 << 10,
                           source=lab.paths[0].client_addr)
        assert 40_000 <= info.rtt_us <= 60_000, info.rtt_us
        queues = impair.queue_counters(lab.proxy.ns)
        assert sorted(queues) == [0, 1]  # path 2 has none


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------

def test_loss_drops_about_its_share_in_each_direction_and_keeps_the_order():
    count = 2000
    with Lab.create([PathSpec(delay_ms=2, loss_pct=10)]) as lab:
        a = lab.paths[0]
        up, _ = udp_burst(lab.client, a.client_addr, lab.server, lab.server_addr, count, 20_000)
        down, _ = udp_burst(lab.server, lab.server_addr, lab.client, a.client_addr, count,
                            20_000)
        shares = [1 - len(got) / count for got in (up, down)]
        print(f"10% loss: lost {shares[0]:.1%} up, {shares[1]:.1%} down of {count} datagrams")
        for got, share in zip((up, down), shares):
            assert 0.05 <= share <= 0.15
            assert got == sorted(set(got))           # no reordering, no duplicates
        # The losses are the emulator's, not an overflow anywhere.
        for node in (lab.client, lab.proxy):
            c = impair.queue_counters(node.ns)[0]
            assert (c.dropped, c.user_dropped) == (0, 0)
            assert c.id_sequence >= count


def test_tcp_over_a_lossy_delayed_path_delivers_every_byte():
    with Lab.create([PathSpec(rate_mbit=50, delay_ms=5, loss_pct=1)]) as lab:
        size = 3 << 20
        seconds, info = transfer(lab.client, lab.server, lab.server_addr, size)
        print(f"3 MiB over 50 Mbit/s, 5 ms, 1% loss: {size * 8 / seconds / MB:.1f} Mbit/s, "
              f"{info.total_retrans} segments retransmitted")
        assert info.total_retrans > 0      # packets were lost, and TCP repaired it


# --------------------------------------------------------------------------
# Multipath
# --------------------------------------------------------------------------

def test_mptcp_uses_both_delayed_paths():
    rate = 20
    with Lab.create([PathSpec(rate_mbit=rate, delay_ms=10),
                     PathSpec(rate_mbit=rate, delay_ms=20)]) as lab:
        size = 6 * MB
        before = [lab.client.link_bytes(a.client_if)[0] for a in lab.paths]
        joins = lab.server.netstat()["MPTcpExt"]["MPJoinAckRx"]
        seconds, info = transfer(lab.client, lab.server, lab.server_addr, size, mptcp=True)
        moved = [lab.client.link_bytes(a.client_if)[0] - b for a, b in zip(lab.paths, before)]
        mbit = size * 8 / seconds / MB
        print(f"MPTCP over 2x{rate} Mbit/s, 10 and 20 ms: {mbit:.1f} Mbit/s, per path {moved}")
        assert info is not None and not info.fallback
        assert info.subflows_total == 2
        assert lab.server.netstat()["MPTcpExt"]["MPJoinAckRx"] == joins + 1
        assert min(moved) > size // 5
        assert mbit > 1.2 * goodput(rate)


# --------------------------------------------------------------------------
# Life cycle
# --------------------------------------------------------------------------

def test_destroying_the_lab_ends_its_emulator_and_leaves_nothing():
    lab = Lab.create([PathSpec(delay_ms=1), PathSpec()])
    try:
        pid = lab.impair_pid
        assert pid is not None and alive(pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"mptcp_proxy.lab.impair" in f.read()
        # It lives in the client namespace, so the lab's teardown finds it.
        assert pid in netns.pids_in([lab.client.ns])[lab.client.ns]
        assert topology.impair_log_path(lab.name).exists()
    finally:
        lab.destroy()
    assert not alive(pid)
    assert not any(netns.exists(ns) for ns in lab.plan.namespaces)
    assert not topology.state_path(lab.name).exists()
    assert not topology.impair_log_path(lab.name).exists()


def test_an_unimpaired_lab_runs_no_emulator():
    with Lab.create([PathSpec(rate_mbit=20)]) as lab:
        assert lab.impair_pid is None
        assert lab.client.run(["iptables-legacy", "-t", "mangle", "-S"]).stdout.count("-A") == 0


def test_a_dead_emulator_stops_its_paths_instead_of_removing_the_delay():
    with Lab.create([PathSpec(delay_ms=5), PathSpec()]) as lab:
        assert connect_times_ms(lab, lab.paths[0].client_addr, lab.server_addr, 1)
        os.kill(lab.impair_pid, signal.SIGKILL)
        with pytest.raises((TimeoutError, socket.timeout)):
            with lab.client.enter():
                sock = socket.socket()
            with sock:
                sock.settimeout(1)
                sock.bind((lab.paths[0].client_addr, 0))
                sock.connect((lab.server_addr, 9))
        # The path without delay does not depend on it.
        assert max(connect_times_ms(lab, lab.paths[1].client_addr, lab.server_addr, 3)) < 100


def test_an_emulator_that_cannot_start_fails_the_build_and_leaves_nothing(monkeypatch):
    name = f"t{secrets.token_hex(3)}"
    real = impair.plan_queues

    def broken(plan):
        return [*real(plan), impair.QueueSpec("mpx-no-such-namespace", "path0", 0, 5.0)]

    monkeypatch.setattr(impair, "plan_queues", broken)
    with pytest.raises(LabError, match="delay emulator exited 1.*does not exist"):
        Lab.create([PathSpec(delay_ms=5)], name=name)
    full = f"mpx-{name}"
    assert not any(netns.exists(ns) for ns in topology.plan_lab(name, [PathSpec()]).namespaces)
    assert not topology.state_path(full).exists()
    assert not topology.impair_log_path(full).exists()


def test_a_queue_has_one_owner_and_a_refusal_is_reported():
    with Lab.create([PathSpec(delay_ms=1)]) as lab:
        with pytest.raises(NfqueueError, match="bind queue 0 .*Operation not permitted"):
            impair.open_queue(impair.QueueSpec(lab.client.ns, "path0", 0, 1.0))
        impair.open_queue(impair.QueueSpec(lab.client.ns, "path0", 7, 1.0)).close()


def test_sigterm_lets_held_packets_go_and_stops_cleanly():
    with Lab.create([PathSpec(delay_ms=300)]) as lab:
        pid = lab.impair_pid
        a = lab.paths[0]
        with lab.server.enter():
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with lab.client.enter():
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with rx, tx:
            rx.bind((lab.server_addr, 0))
            tx.bind((a.client_addr, 0))
            tx.sendto(b"held", rx.getsockname())
            time.sleep(0.05)                 # queued, and far from due
            os.kill(pid, signal.SIGTERM)
            rx.settimeout(0.2)               # well before the 300 ms delay
            assert rx.recv(64) == b"held"
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(pid)
        log_text = topology.impair_log_path(lab.name).read_text()
        assert "stopped" in log_text and "'released': 1" in log_text


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a process of its own, which has exited when this returns."""
    return subprocess.run([sys.executable, "-m", "mptcp_proxy", *argv], capture_output=True,
                          text=True, timeout=60)


def test_a_persistent_cli_lab_keeps_its_delay_after_the_cli_exits():
    name = f"mpx-t{secrets.token_hex(3)}"
    try:
        up = run_cli("lab", "up", "--name", name, "--paths", "1", "--delay", "10")
        assert up.returncode == 0, up.stderr
        assert "10 ms delay each way" in up.stdout
        lab = Lab.attach(name)
        assert lab.persistent and lab.impair_pid is not None and alive(lab.impair_pid)
        rtt = statistics.median(connect_times_ms(lab, lab.paths[0].client_addr,
                                                 lab.server_addr, 5))
        assert 20 <= rtt <= 25, rtt
        listed = run_cli("lab", "list")
        assert "delay ms=[10]" in listed.stdout
        down = run_cli("lab", "down", name)
        assert down.returncode == 0, down.stderr
        assert not alive(lab.impair_pid)
        assert not any(netns.exists(ns) for ns in lab.plan.namespaces)
    finally:
        remove_lab(name)


# --------------------------------------------------------------------------
# Throughput of the emulator (figures printed; bounds only catch a broken path)
# --------------------------------------------------------------------------

def test_a_shaped_delayed_path_runs_at_its_shaped_rate():
    rate = 50
    with Lab.create([PathSpec(rate_mbit=rate, delay_ms=10)]) as lab:
        size = 4 * MB
        up, _ = transfer(lab.client, lab.server, lab.server_addr, size)
        down, _ = transfer(lab.server, lab.client, lab.paths[0].client_addr, size, seed=1)
        up_mbit, down_mbit = (size * 8 / s / MB for s in (up, down))
        print(f"tbf {rate} Mbit/s + 10 ms each way: up {up_mbit:.1f}, down {down_mbit:.1f} "
              f"Mbit/s goodput (tbf alone: {goodput(rate):.1f})")
        # 4 MB includes slow start over a 20 ms round trip: 0.8 leaves room for it.
        assert min(up_mbit, down_mbit) > 0.8 * goodput(rate)


def test_emulator_packet_rate_on_an_unshaped_delayed_path():
    with Lab.create([PathSpec(delay_ms=10)]) as lab:
        a = lab.paths[0]
        size = 20 << 20
        seconds, _ = transfer(lab.client, lab.server, lab.server_addr, size)
        tcp_mbit = size * 8 / seconds / MB
        # Small datagrams: every one is a packet for the emulator.
        count, offered = 20_000, 20_000
        got, seconds = udp_burst(lab.client, a.client_addr, lab.server, lab.server_addr,
                                 count, offered)
        pps = len(got) / seconds
        c = impair.queue_counters(lab.proxy.ns)[0]
        print(f"unshaped + 10 ms: TCP {tcp_mbit:.0f} Mbit/s (GSO packets whole); UDP "
              f"{len(got)}/{count} datagrams at {offered} pps offered ({pps:.0f} pps "
              f"delivered), kernel queue drops {c.dropped}+{c.user_dropped}")
        assert tcp_mbit > 100
        assert len(got) >= 0.99 * count
