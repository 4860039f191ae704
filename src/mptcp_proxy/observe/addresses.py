"""The addresses of this thread's network namespace, from /proc (no netlink needed).

A proxy must refuse targets that are its own addresses (a connection there
would loop back into it) and its subnets' directed broadcast addresses.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from mptcp_proxy.modes.policy import IPAddress

THREAD_PROC_NET = Path("/proc/thread-self/net")  # this thread's namespace, not the process's


def parse_fib_trie(text: str) -> tuple[set[IPAddress], set[IPAddress]]:
    """(local, broadcast) IPv4 addresses from /proc/net/fib_trie."""
    local: set[IPAddress] = set()
    broadcast: set[IPAddress] = set()
    leaf: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            leaf = stripped[3:].strip()
        elif stripped.startswith("/") and leaf is not None:
            kind = stripped.split()[-1]
            try:
                address = ipaddress.IPv4Address(leaf)
            except ValueError:
                continue
            if kind == "LOCAL":
                local.add(address)
            elif kind == "BROADCAST":
                broadcast.add(address)
    return local, broadcast


def parse_if_inet6(text: str) -> set[IPAddress]:
    """IPv6 addresses from /proc/net/if_inet6 (32 hex digits first on each line)."""
    found: set[IPAddress] = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.add(ipaddress.IPv6Address(int(fields[0], 16)))
            except ValueError:
                continue
    return found


def local_addresses() -> tuple[set[IPAddress], set[IPAddress]]:
    """(own addresses, directed broadcast addresses) of this thread's network namespace."""
    try:
        local, broadcast = parse_fib_trie((THREAD_PROC_NET / "fib_trie").read_text())
    except OSError:
        local, broadcast = set(), set()
    try:
        local |= parse_if_inet6((THREAD_PROC_NET / "if_inet6").read_text())
    except OSError:
        pass  # IPv6 disabled
    return local, broadcast
