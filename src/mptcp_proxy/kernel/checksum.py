"""DSS checksums (RFC 8684 §3.3) for the MPTCP connections a proxy touches.

The checksum is negotiated in the MP_CAPABLE handshake and used by both ends
as soon as either asks (RFC 8684 §3.1). The kernel has no per-socket option
for it: ``net.mptcp.checksum_enabled`` in the socket's network namespace
decides, read when the socket is created (connect) or when the SYN reaches
the listener (accept). A proxy run with ``--dss-checksum on`` therefore holds
that sysctl at 1 for as long as it runs, shared with the other proxies of
the namespace and restored by the last one to exit, or by the next start
after a crash (:class:`~mptcp_proxy.kernel.sysctl.SharedSysctlBits`).

On by default, except where TCP Fast Open is used. On Linux 6.18.44
multipath connections can deliver wrong bytes either way (docs/kernel/
dss-corruption.md): through the proxy, with checksums none of 4,000
transfers through forward, SOCKS5, HTTP CONNECT and the agent were wrong
(without: 6 of 2,000 through SOCKS5 and HTTP CONNECT), but 27 of 1,000 0-RTT
converted uploads had their first bytes replaced (without: 1 of 3,000). So
the converter and the agent with ``--tfo`` leave them off.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mptcp_proxy.errors import KernelError
from mptcp_proxy.kernel.sysctl import SHARED_STATE_DIR, SharedSysctlBits, read_sysctl

log = logging.getLogger(__name__)

CHECKSUM_SYSCTL = "net.mptcp.checksum_enabled"


def checksum_enabled() -> bool | None:
    """The calling thread's namespace asks for DSS checksums (None: the kernel
    has no such sysctl, i.e. no MPTCP or older than Linux 5.14)."""
    try:
        return read_sysctl(CHECKSUM_SYSCTL) == "1"
    except KernelError:
        return None


def hold_dss_checksum(option: str = "--dss-checksum",
                      state_dir: Path = SHARED_STATE_DIR) -> SharedSysctlBits | None:
    """Turn DSS checksums on in the calling thread's namespace until released.

    Returns the holder to ``release()`` at exit, or None when the value could
    not be recorded (no write access to ``/run`` or ``/proc/sys``) but is 1
    already: checksums are in force, set by someone else. Raises
    :class:`KernelError` saying what to do when they cannot be turned on.
    """
    holder = SharedSysctlBits(CHECKSUM_SYSCTL, 1, state_dir)
    try:
        holder.acquire()
    except KernelError as exc:
        enabled = checksum_enabled()
        if enabled is None:
            raise KernelError(f"{CHECKSUM_SYSCTL} is missing (MPTCP off, or a kernel older "
                              f"than 5.14): DSS checksums are unavailable; pass "
                              f"{option} off to run without them") from None
        if enabled:
            log.warning("%s is 1 but this process cannot register as a user of it (%s); "
                        "leaving it as it is", CHECKSUM_SYSCTL, exc)
            return None
        raise KernelError(f"cannot turn on DSS checksums ({exc}): run as root (writing "
                          f"{CHECKSUM_SYSCTL} needs uid 0 or CAP_NET_ADMIN, and the shared "
                          f"record needs write access to {state_dir}), set it to 1 yourself, "
                          f"or pass {option} off") from None
    if holder.recovered:
        log.warning("%s: restored what a process that died had left set", CHECKSUM_SYSCTL)
    return holder
