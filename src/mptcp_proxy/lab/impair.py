"""Link impairments for labs: one-way delay and random loss, emulated on NFQUEUE.

The machine has no netem qdisc, so a lab path gets its delay and loss from a
small user-space emulator: an iptables NFQUEUE rule hands every packet
arriving on an impaired path end to an nfnetlink queue; the emulator holds the
packet's id for the delay, then accepts it, or drops it with the path's loss
probability. Payload never leaves the kernel (copy mode META): the emulator
only sees ids.

Design rules:
- Each direction of a path is one queue, at its receiving end: the path's
  gateway queues what arrives on ``proxy_if``, the client what arrives on
  ``client_if``. A round trip crosses the delay twice; loss applies per
  direction. nfqueue instances are per network namespace, so queue ``i``
  serves path ``i`` at both ends.
- Receiving end, not sending end (measured, 50 Mbit/s tbf, 10 ms): a packet
  held on egress still belongs to its sending socket, and TCP small queues
  then throttle the sender to about 1 ms of data in flight per delay
  (4.4 Mbit/s uploads). On ingress the veth has already released it
  (46.9 Mbit/s both ways), and the delay comes after the tbf, like
  propagation after serialisation.
- This kernel has no nftables ``queue`` expression (nft_queue), only the
  x_tables NFQUEUE target: the rules are iptables-legacy rules in a chain
  of our own. No ``--queue-bypass``: when the emulator is gone, packets of an
  impaired path are dropped, so a dead emulator stops traffic visibly
  instead of silently removing the delay.
- Packets keep their order: a constant delay releases them in arrival order,
  with one batch verdict (every id up to N) per release.
- GSO packets are taken whole on paths without loss (fewer packets to
  handle); with loss they are segmented by the kernel so that a loss is one
  wire packet.
- :class:`DelayLine` holds the whole policy and is driven with ``now``; the
  socket loop around it (:class:`Emulator`) only moves ids.
- One emulator process per lab, living in the client namespace, so lab
  teardown kills it with everything else. It opens the gateway's sockets by
  entering that namespace first, and says ``ready`` on stdout once every queue
  is bound.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mptcp_proxy.errors import LabError
from mptcp_proxy.lab import netns
from mptcp_proxy.lab.nfqueue import (
    NETLINK_NETFILTER,
    NETLINK_NO_ENOBUFS,
    SOL_NETLINK,
    Ack,
    ConfigFlag,
    CopyMode,
    NfqueueError,
    QueuedPacket,
    Verdict,
    bind_request,
    config_request,
    decode_messages,
    fast_packet_id,
    verdict_message,
)
from mptcp_proxy.lab.topology import LabPlan, check_impairment

log = logging.getLogger(__name__)

CHAIN = "MPX_IMPAIR"           # our iptables chain (table mangle) in each namespace
RESTORE_TOOLS = ("iptables-legacy-restore", "ip6tables-legacy-restore")
QUEUE_MAXLEN = 10_000          # packets the kernel holds per queue before dropping
# Netlink messages waiting to be read: one per packet, ~1 KiB of truesize each.
RCVBUF_BYTES = 8 << 20
SO_RCVBUFFORCE = 33            # <asm-generic/socket.h>; Python 3.11 lacks it
RECV_BYTES = 1 << 16
RECV_BUDGET = 256              # messages read from one socket before serving timers
ACK_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 10.0
READY_LINE = "ready"
PROC_QUEUES = "netfilter/nfnetlink_queue"


# --------------------------------------------------------------------------
# What to emulate: pure
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueSpec:
    """One direction of one impaired path: where its queue is and what it does."""

    ns: str
    """Network namespace at the receiving end of the direction."""
    ifname: str
    """Interface, in ``ns``, whose incoming packets are delayed and lost."""
    queue: int
    """nfqueue number (per namespace)."""
    delay_ms: float = 0.0
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        check_impairment(self.delay_ms, self.loss_pct)
        if not 0 <= self.queue <= 0xFFFF:
            raise LabError(f"queue number {self.queue} is out of range")

    def to_arg(self) -> str:
        return f"{self.ns}:{self.ifname}:{self.queue}:{self.delay_ms!r}:{self.loss_pct!r}"

    @classmethod
    def from_arg(cls, text: str) -> QueueSpec:
        try:
            ns, ifname, queue, delay, loss = text.split(":")
            return cls(ns, ifname, int(queue), float(delay), float(loss))
        except ValueError:
            raise LabError(f"bad queue spec {text!r} (NS:IF:QUEUE:DELAY_MS:LOSS_PCT)") from None


def plan_queues(plan: LabPlan) -> list[QueueSpec]:
    """The queues a lab needs: two per path with delay or loss, none for the others.

    Path ``i`` gets queue ``i`` at both of its ends: in the gateway's
    namespace for what arrives on ``proxy_if`` (client to gateway), in the
    client's for what arrives on ``client_if`` (gateway to client).
    """
    queues = []
    for a in plan.paths:
        if not a.spec.impaired:
            continue
        queues += [QueueSpec(plan.ns(a.gateway), a.proxy_if, a.index, a.delay_ms, a.loss_pct),
                   QueueSpec(plan.ns("client"), a.client_if, a.index, a.delay_ms, a.loss_pct)]
    return queues


def render_rules(specs: Sequence[QueueSpec]) -> str:
    """``iptables-restore --noflush`` input queueing what arrives on ``specs``' interfaces.

    The same text serves IPv4 and IPv6. No ``--queue-bypass``: without a
    listener the kernel drops the packet.
    """
    rules = "".join(f"-A {CHAIN} -i {s.ifname} -j NFQUEUE --queue-num {s.queue}\n"
                    for s in specs)
    return (f"*mangle\n:{CHAIN} - [0:0]\n-A PREROUTING -j {CHAIN}\n"
            f"{rules}COMMIT\n")


class DelayLine:
    """One queue's policy: which packets are lost, when the others leave.

    Constant delay, so packets leave in arrival order and a deque is enough.
    """

    def __init__(self, delay_ms: float, loss_pct: float, rng: random.Random) -> None:
        check_impairment(delay_ms, loss_pct)
        self.delay_s = delay_ms / 1000.0
        self.loss = loss_pct / 100.0
        self._rng = rng
        self._held: deque[tuple[float, int]] = deque()  # (due, packet id)
        self.received = 0
        self.lost = 0
        self.released = 0
        self.max_held = 0
        self.max_late_s = 0.0

    def arrive(self, packet_id: int, now: float) -> bool:
        """Take packet ``packet_id``; False: it is lost (drop it now)."""
        self.received += 1
        if self.loss and self._rng.random() < self.loss:
            self.lost += 1
            return False
        self._held.append((now + self.delay_s, packet_id))
        if len(self._held) > self.max_held:
            self.max_held = len(self._held)
        return True

    def next_due(self) -> float | None:
        return self._held[0][0] if self._held else None

    def release(self, now: float) -> int | None:
        """The id of the last packet due by ``now`` (accept every id up to it), or None.

        Never early: the delay is a minimum, like a wire's; wake-ups only add to it.
        """
        held = self._held
        last = None
        while held and held[0][0] <= now:
            due, last = held.popleft()
            self.released += 1
            if now - due > self.max_late_s:
                self.max_late_s = now - due
        return last

    def release_all(self) -> int | None:
        """Let everything go now (shutdown); not counted as late."""
        last = None
        while self._held:
            last = self._held.popleft()[1]
            self.released += 1
        return last

    @property
    def held(self) -> int:
        return len(self._held)


# --------------------------------------------------------------------------
# The emulator: sockets and timers
# --------------------------------------------------------------------------

@dataclass
class _Queue:
    spec: QueueSpec
    line: DelayLine
    sock: socket.socket
    drops: list[int] = field(default_factory=list)


def _rng_for(seed: int | None, spec: QueueSpec) -> random.Random:
    # Each queue its own stream: one path's traffic does not change another's losses.
    return random.Random(None if seed is None else f"{seed}/{spec.ns}/{spec.queue}")


def _request(sock: socket.socket, message: bytes, seq: int, what: str) -> None:
    """Send a request that asks for an ACK and wait for it (the socket is blocking)."""
    sock.send(message)
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data = sock.recv(RECV_BYTES)
        except (TimeoutError, socket.timeout):
            raise NfqueueError(f"{what}: no answer from the kernel") from None
        for msg in decode_messages(data):
            if isinstance(msg, Ack) and msg.seq == seq:
                if msg.errno:
                    raise NfqueueError(f"{what}: {os.strerror(msg.errno)}")
                return


def open_queue(spec: QueueSpec) -> socket.socket:
    """A netlink socket in ``spec.ns`` bound to queue ``spec.queue`` and configured."""
    with netns.enter(spec.ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        try:
            # Root may exceed net.core.rmem_max.
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        sock.bind((0, 0))
        what = f"queue {spec.queue} in {spec.ns}"
        _request(sock, bind_request(spec.queue, seq=1), 1, f"bind {what}")
        # GSO packets whole when nothing is lost (fewer packets to handle);
        # segmented when loss applies, so that a loss is one wire packet.
        flags = ConfigFlag(0) if spec.loss_pct else ConfigFlag.GSO
        _request(sock, config_request(spec.queue, copy_mode=CopyMode.META,
                                      maxlen=QUEUE_MAXLEN, flags=flags, mask=ConfigFlag.GSO,
                                      seq=2), 2, f"configure {what}")
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Emulator:
    """Serves a set of queues until :meth:`stop` (or SIGTERM in :func:`main`)."""

    def __init__(self, specs: Sequence[QueueSpec], seed: int | None = None) -> None:
        if not specs:
            raise LabError("an emulator needs at least one queue")
        self.specs = list(specs)
        self.seed = seed
        self.queues: list[_Queue] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False

    def open(self) -> None:
        try:
            for spec in self.specs:
                sock = open_queue(spec)
                self.queues.append(_Queue(spec, DelayLine(spec.delay_ms, spec.loss_pct,
                                                          _rng_for(self.seed, spec)), sock))
                log.info("queue %d in %s bound: %s ingress, delay %g ms, loss %g%%",
                         spec.queue, spec.ns, spec.ifname, spec.delay_ms, spec.loss_pct)
        except BaseException:
            self.close()
            raise

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler or another thread)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def run(self) -> None:
        by_fd = {q.sock.fileno(): q for q in self.queues}
        fds = [*by_fd, self._wake_r]
        buf = bytearray(RECV_BYTES)
        view = memoryview(buf)
        queues = self.queues
        monotonic = time.monotonic
        while not self._stopping:
            due = [d for q in queues if (d := q.line.next_due()) is not None]
            timeout = max(0.0, min(due) - monotonic()) if due else None
            ready, _, _ = select.select(fds, (), (), timeout)
            now = monotonic()
            for fd in ready:
                q = by_fd.get(fd)
                if q is not None:
                    self._receive(q, buf, view, now)
            for q in queues:
                # Drops first: the batch that follows must not cover a lost packet.
                data = b""
                if q.drops:
                    data = b"".join(verdict_message(q.spec.queue, i, Verdict.DROP)
                                    for i in q.drops)
                    q.drops.clear()
                last = q.line.release(now)
                if last is not None:
                    data += verdict_message(q.spec.queue, last, Verdict.ACCEPT, batch=True)
                if data:
                    self._send(q, data)
        self._release_all(buf, view)

    def _receive(self, q: _Queue, buf: bytearray, view: memoryview, now: float) -> None:
        recv_into, arrive = q.sock.recv_into, q.line.arrive
        for _ in range(RECV_BUDGET):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # Messages were lost (their packets dropped by the kernel); go on.
                log.warning("queue %d: socket buffer overrun", q.spec.queue)
                continue
            packet_id = fast_packet_id(buf, n)
            if packet_id is not None:
                if not arrive(packet_id, now):
                    q.drops.append(packet_id)
                continue
            for msg in decode_messages(view[:n]):  # several messages, or not a packet
                if isinstance(msg, QueuedPacket):
                    if not arrive(msg.packet_id, now):
                        q.drops.append(msg.packet_id)
                elif isinstance(msg, Ack) and msg.errno:
                    log.warning("queue %d: kernel refused a verdict: %s", q.spec.queue,
                                os.strerror(msg.errno))

    def _send(self, q: _Queue, data: bytes) -> None:
        try:
            q.sock.send(data)
        except BlockingIOError:  # the kernel handles verdicts synchronously: rare
            q.sock.setblocking(True)
            try:
                q.sock.send(data)
            finally:
                q.sock.setblocking(False)

    def _release_all(self, buf: bytearray, view: memoryview) -> None:
        """Let held and unread packets go on shutdown instead of having the kernel drop them."""
        for q in self.queues:
            try:
                self._receive(q, buf, view, time.monotonic())
                data = b"".join(verdict_message(q.spec.queue, i, Verdict.DROP)
                                for i in q.drops)
                q.drops.clear()
                last = q.line.release_all()
                if last is not None:
                    data += verdict_message(q.spec.queue, last, Verdict.ACCEPT, batch=True)
                if data:
                    self._send(q, data)
            except OSError as exc:
                log.warning("queue %d: final verdicts failed: %s", q.spec.queue, exc)

    def stats(self) -> list[dict[str, object]]:
        return [{"ns": q.spec.ns, "if": q.spec.ifname, "queue": q.spec.queue,
                 "received": q.line.received, "lost": q.line.lost,
                 "released": q.line.released, "max_held": q.line.max_held,
                 "max_late_ms": round(q.line.max_late_s * 1000, 3)}
                for q in self.queues]

    def close(self) -> None:
        for q in self.queues:
            q.sock.close()
        self.queues = []
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1


# --------------------------------------------------------------------------
# Kernel counters
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueCounters:
    """A line of /proc/net/netfilter/nfnetlink_queue (per network namespace)."""

    queue: int
    portid: int
    waiting: int          # packets held in the kernel for a verdict
    copy_mode: int
    copy_range: int
    dropped: int          # queue full (QUEUE_MAXLEN)
    user_dropped: int     # the message did not fit in our socket buffer
    id_sequence: int      # ids handed out: packets queued so far


def parse_queue_counters(text: str) -> dict[int, QueueCounters]:
    counters = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        c = QueueCounters(*(int(f) for f in fields[:8]))
        counters[c.queue] = c
    return counters


def queue_counters(ns: str) -> dict[int, QueueCounters]:
    """The kernel's counters of every nfqueue in ``ns``, by queue number."""
    with netns.enter(ns):
        text = (netns.THREAD_PROC_NET / PROC_QUEUES).read_text()
    return parse_queue_counters(text)


# --------------------------------------------------------------------------
# Starting the emulator process for a lab
# --------------------------------------------------------------------------

def install_rules(ns: str, specs: Sequence[QueueSpec]) -> None:
    """Queue what arrives on ``specs``' interfaces in ``ns``, IPv4 and IPv6.

    Needs ``iptables-legacy-restore`` (Debian package ``iptables``).
    """
    script = render_rules(specs)
    for tool in RESTORE_TOOLS:
        if shutil.which(tool) is None:
            raise LabError(f"{tool} is not installed (Debian package iptables); "
                           "path delay and loss need it")
        netns.run(ns, [tool, "--noflush"], input=script)


def start(home_ns: str, specs: Sequence[QueueSpec], log_path: Path, *,
          seed: int | None = None, timeout: float = READY_TIMEOUT_S) -> subprocess.Popen:
    """Start an emulator process in ``home_ns``; return once every queue is bound.

    The process has a session of its own (it outlives a CLI that started a
    persistent lab) and writes its log to ``log_path``. A process that does
    not come up is killed and reported as a LabError with its log.
    """
    argv = [sys.executable, "-m", "mptcp_proxy.lab.impair"]
    if seed is not None:
        argv += ["--seed", str(seed)]
    argv += [s.to_arg() for s in specs]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = netns.popen(home_ns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=log_file, start_new_session=True, text=True)
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], (), (), timeout)
        line = proc.stdout.readline().strip() if ready else ""
    finally:
        proc.stdout.close()
    if line != READY_LINE:
        proc.kill()
        proc.wait()
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        why = "did not get ready in time" if not ready else f"exited {proc.returncode}"
        raise LabError(f"delay emulator {why}: " + (" | ".join(tail) or "no log"))
    return proc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mptcp_proxy.lab.impair",
        description="Delay and loss for lab paths, on nfnetlink queues (run by the lab).")
    parser.add_argument("--seed", type=int, help="seed of the loss draws (default: random)")
    parser.add_argument("queues", nargs="+", type=QueueSpec.from_arg,
                        metavar="NS:IF:QUEUE:DELAY_MS:LOSS_PCT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s impair[%(process)d] %(levelname)s %(message)s")
    emulator = Emulator(args.queues, seed=args.seed)
    try:
        emulator.open()
    except (OSError, LabError) as exc:
        log.error("cannot bind the queues: %s", exc)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: emulator.stop())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Tell the lab we are ready, then let go of its pipe: it may be gone soon.
    print(READY_LINE, flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    log.info("ready: %d queues", len(emulator.queues))
    try:
        emulator.run()
    finally:
        for s in emulator.stats():
            log.info("queue stats: %s", s)
        emulator.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
