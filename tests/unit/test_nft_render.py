from __future__ import annotations

import pytest

from mptcp_proxy.errors import KernelError
from mptcp_proxy.kernel.nft import render_table


def test_render_replaces_table_atomically():
    body = "  chain out {\n    type nat hook output priority -100;\n  }\n"
    assert render_table("inet", "mptcp_proxy_x", body) == (
        "table inet mptcp_proxy_x\n"
        "delete table inet mptcp_proxy_x\n"
        "table inet mptcp_proxy_x {\n"
        "  chain out {\n    type nat hook output priority -100;\n  }\n"
        "}\n")


@pytest.mark.parametrize("family, name", [("inet", "bad name"), ("inet", "1abc"),
                                          ("inet", "x;flush ruleset"), ("foo", "ok")])
def test_render_rejects_bad_names(family, name):
    with pytest.raises(KernelError):
        render_table(family, name, "")
