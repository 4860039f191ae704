"""nftables tables owned by mptcp-proxy: rendered as text, applied atomically, removed.

Design rules (STYLE.md):
- A mode renders its ruleset with a pure function (golden-tested); this module
  only applies text. One table per running proxy, named by the mode, so that two
  proxies never touch each other's rules and removal is one ``delete table``.
- Applying is one ``nft -f`` transaction that also replaces a stale table of the
  same name (left by a crashed run), so a restart never stacks rules.
- :class:`NftTable` is a context manager: the table goes away on exit, also on
  errors. Set elements can be added at run time (``add_element``).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

from mptcp_proxy.errors import KernelError

log = logging.getLogger(__name__)

FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
NFT_TIMEOUT_S = 10.0


def check_name(name: str, what: str = "table") -> str:
    if not _NAME.match(name):
        raise KernelError(f"bad nftables {what} name {name!r}")
    return name


def render_table(family: str, name: str, body: str) -> str:
    """A transaction that creates (or atomically replaces) table ``family name``.

    The empty ``table`` line makes ``delete table`` valid when no stale table
    exists; both run in the same transaction as the new definition.
    """
    if family not in FAMILIES:
        raise KernelError(f"bad nftables family {family!r}")
    check_name(name)
    return (f"table {family} {name}\n"
            f"delete table {family} {name}\n"
            f"table {family} {name} {{\n{body.rstrip()}\n}}\n")


def nft(script: str, *, args: tuple[str, ...] = ()) -> str:
    """Run ``nft -f -`` with ``script`` in the calling thread's network namespace."""
    exe = shutil.which("nft")
    if exe is None:
        raise KernelError("nft is not installed (Debian package nftables)")
    try:
        proc = subprocess.run([exe, *args, "-f", "-"], input=script, text=True,
                              capture_output=True, timeout=NFT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise KernelError("nft timed out") from None
    if proc.returncode != 0:
        raise KernelError(f"nft failed: {proc.stderr.strip()}\n--- script ---\n{script}")
    return proc.stdout


def nft_cmd(*argv: str) -> str:
    """Run one ``nft`` command line (``nft list table inet foo``)."""
    exe = shutil.which("nft")
    if exe is None:
        raise KernelError("nft is not installed (Debian package nftables)")
    proc = subprocess.run([exe, *argv], text=True, capture_output=True, timeout=NFT_TIMEOUT_S)
    if proc.returncode != 0:
        raise KernelError(f"nft {' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def table_exists(family: str, name: str) -> bool:
    try:
        nft_cmd("list", "table", family, check_name(name))
    except KernelError:
        return False
    return True


class NftTable:
    """A table this process installed and will remove."""

    def __init__(self, family: str, name: str, body: str) -> None:
        self.family = family
        self.name = check_name(name)
        self.body = body
        self.installed = False

    @property
    def script(self) -> str:
        return render_table(self.family, self.name, self.body)

    def apply(self) -> "NftTable":
        nft(self.script)
        self.installed = True
        log.info("nftables: table %s %s installed", self.family, self.name)
        return self

    def add_element(self, set_name: str, element: str) -> None:
        """``add element`` to a set of this table (element in nft syntax, e.g.
        ``10.0.0.1 . 443 timeout 60s``)."""
        check_name(set_name, "set")
        nft(f"add element {self.family} {self.name} {set_name} {{ {element} }}\n")

    def remove(self) -> None:
        if not self.installed:
            return
        try:
            nft(f"delete table {self.family} {self.name}\n")
            log.info("nftables: table %s %s removed", self.family, self.name)
        finally:
            self.installed = False

    def __enter__(self) -> "NftTable":
        return self.apply()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
