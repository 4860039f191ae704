"""A bare network namespace of a test's own: loopback up, nothing else; deleted after."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator

from mptcp_proxy.lab import netns


@contextlib.contextmanager
def bare_namespace(prefix: str) -> Iterator[str]:
    """The name of a new namespace ``mpx-PREFIX-XXXXXX``, removed on exit (also on failure)."""
    name = f"mpx-{prefix}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        netns.delete([name])
