"""``--dss-checksum on|off``: every mode has it; on by default except for the
converter, where with TCP Fast Open checksums made uploads wrong on Linux 6.18
(README, "Data integrity"). Pure, no root."""

from __future__ import annotations

import pytest

from mptcp_proxy.cli import main as cli_main
from mptcp_proxy.cli import app_proxy_cmd, client_cmd, convert_cmd, forward_cmd, transparent_cmd
from mptcp_proxy.config import parse_on_off
from mptcp_proxy.errors import ConfigError
from mptcp_proxy.lab.topology import node_sysctls
from mptcp_proxy.server.base import new_session, server_arguments, yes_no

ARGV = {
    "forward": (forward_cmd, ["forward", "--listen", ":8080", "--to", "192.0.2.1:80"]),
    "convert": (convert_cmd, ["convert", "--listen", ":5124"]),
    "socks5": (app_proxy_cmd, ["socks5", "--listen", ":1080"]),
    "http-connect": (app_proxy_cmd, ["http-connect", "--listen", ":3128"]),
    "transparent": (transparent_cmd, ["transparent"]),
    "client": (client_cmd, ["client", "--converter", "192.0.2.1:5124",
                            "--socks5", "127.0.0.1:1080"]),
}


def config(mode: str, *extra: str):
    module, argv = ARGV[mode]
    args = cli_main.build_parser().parse_args([*argv, *extra])
    return module.config_from_args(args)


@pytest.mark.parametrize("mode", sorted(ARGV))
def test_every_mode_has_the_switch_with_its_measured_default(mode):
    assert config(mode).dss_checksum is (mode != "convert")
    assert config(mode, "--dss-checksum", "off").dss_checksum is False
    assert config(mode, "--dss-checksum", "on").dss_checksum is True
    assert server_arguments(config(mode, "--dss-checksum", "on"))["dss_checksum"] is True
    assert server_arguments(config(mode, "--dss-checksum", "off"))["dss_checksum"] is False


def test_the_config_dataclasses_carry_the_same_defaults():
    from mptcp_proxy.config import Endpoint, ForwardConfig
    from mptcp_proxy.config_convert import ConvertConfig
    listen = Endpoint("192.0.2.1", 1)
    assert ForwardConfig(listen=listen, target=listen).dss_checksum is True
    assert ConvertConfig(listen=listen).dss_checksum is False


def test_the_agent_asks_for_checksums_unless_it_uses_tcp_fast_open():
    assert config("client").tfo is False and config("client").dss_checksum is True
    assert config("client", "--tfo").dss_checksum is False
    assert config("client", "--tfo-no-cookie").tfo is True
    assert config("client", "--tfo", "--dss-checksum", "on").dss_checksum is True
    assert config("client", "--dss-checksum", "off").dss_checksum is False


@pytest.mark.parametrize("mode", sorted(ARGV))
def test_a_bad_value_names_the_option(mode):
    with pytest.raises(ConfigError, match="--dss-checksum: expected on or off"):
        config(mode, "--dss-checksum", "maybe")


def test_on_off_spellings():
    assert [parse_on_off(t, "k") for t in ("on", "ON", "yes", "true", "1")] == [True] * 5
    assert [parse_on_off(t, "k") for t in ("off", "no", "False", "0")] == [False] * 4


def test_lab_hosts_ask_for_checksums_only_when_told_and_the_proxy_is_left_to_the_proxy():
    for role in ("client", "server", "mpserver"):
        assert ("net.mptcp.checksum_enabled", 1) not in node_sysctls(role, "operator")
        assert ("net.mptcp.checksum_enabled", 1) in node_sysctls(role, "operator",
                                                                 dss_checksum=True)
    for role in ("proxy", "wifi"):
        assert all(k != "net.mptcp.checksum_enabled"
                   for k, _ in node_sysctls(role, "operator", dss_checksum=True))


def test_the_log_line_spells_the_checksum_flags():
    session = new_session(1, "10.0.0.1:1234")
    assert (session.client_csum, session.upstream_csum) == (None, None)
    assert [yes_no(None), yes_no(True), yes_no(False)] == ["-", "yes", "no"]
