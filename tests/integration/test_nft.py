from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from mptcp_proxy.kernel.nft import NftTable, nft_cmd, table_exists
from mptcp_proxy.lab import netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

BODY = """  set seen {
    type ipv4_addr . inet_service
    flags timeout
  }
  chain out {
    type filter hook output priority 0;
    ip daddr . tcp dport @seen counter
  }
"""


@pytest.fixture
def ns():
    name = f"mpx-nft-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_table_applied_replaced_and_removed(ns):
    with netns.enter(ns):
        with NftTable("inet", "mptcp_proxy_test", BODY) as table:
            assert table_exists("inet", "mptcp_proxy_test")
            table.add_element("seen", "10.1.2.3 . 443 timeout 60s")
            assert "10.1.2.3 . 443" in nft_cmd("list", "set", "inet", "mptcp_proxy_test", "seen")
            # A second apply (a restart over a stale table) replaces, never stacks.
            NftTable("inet", "mptcp_proxy_test", BODY).apply()
            listing = nft_cmd("list", "table", "inet", "mptcp_proxy_test")
            assert listing.count("chain out") == 1
            assert "10.1.2.3" not in listing
        assert not table_exists("inet", "mptcp_proxy_test")
