"""Network-namespace labs: a multipath client, a proxy and a server, shaped paths.

    from mptcp_proxy.lab import Lab, PathSpec
    with Lab.create(paths=[PathSpec(rate_mbit=20), PathSpec(rate_mbit=30)]) as lab:
        lab.client.run(["ip", "-br", "addr"])
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
