"""Parsers of per-namespace /proc files. Pure, no root."""

from __future__ import annotations

import pytest

from mptcp_proxy.errors import LabError
from mptcp_proxy.lab.netns import parse_net_dev, parse_netstat

NETSTAT = """\
TcpExt: SyncookiesSent SyncookiesRecv TCPFastOpenActive
TcpExt: 0 2 7
IpExt: InNoRoutes InOctets
IpExt: 1 123456789012
MPTcpExt: MPCapableSYNRX MPJoinSynRx
MPTcpExt: 3 4
"""

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     120       2    0    0    0     0          0         0      120       2    0    0    0     0       0          0
 path0: 5000000    3400    0    0    0     0          0         0  9999999    6800    0    0    0     0       0          0
"""


def test_parse_netstat_pairs_sections():
    counters = parse_netstat(NETSTAT)
    assert counters == {
        "TcpExt": {"SyncookiesSent": 0, "SyncookiesRecv": 2, "TCPFastOpenActive": 7},
        "IpExt": {"InNoRoutes": 1, "InOctets": 123456789012},
        "MPTcpExt": {"MPCapableSYNRX": 3, "MPJoinSynRx": 4},
    }


def test_parse_netstat_refuses_unpaired_sections():
    with pytest.raises(LabError, match="unpaired"):
        parse_netstat("TcpExt: A B\nIpExt: 1 2\n")


def test_parse_net_dev_gives_tx_then_rx_bytes():
    assert parse_net_dev(NET_DEV) == {"lo": (120, 120), "path0": (9999999, 5000000)}
