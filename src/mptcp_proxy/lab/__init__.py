"""Network-namespace labs: a multipath client, a proxy and a server, shaped paths.

    from mptcp_proxy.lab import Lab, PathSpec
    with Lab.create(paths=[PathSpec(rate_mbit=20), PathSpec(rate_mbit=30)]) as lab:
        lab.client.run(["ip", "-br", "addr"])

Paths can also have a one-way delay and random loss in each direction,
``PathSpec(rate_mbit=20, delay_ms=10, loss_pct=1)`` (emulated on NFQUEUE by
:mod:`mptcp_proxy.lab.impair`: there is no netem here).
"""

from mptcp_proxy.lab.topology import (
    AccessPath,
    Lab,
    LabPlan,
    Node,
    PathSpec,
    list_labs,
    plan_lab,
    remove_lab,
)

__all__ = ["AccessPath", "Lab", "LabPlan", "Node", "PathSpec", "list_labs", "plan_lab",
           "remove_lab"]
