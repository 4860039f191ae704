"""What each mode needs from the process, read from /proc/self/status (kernel/privileges.py).

Pure: fake status texts stand in for the process; the few checks that look at
the real process only use files the test owns.
"""

from __future__ import annotations

import os

import pytest

from mptcp_proxy.errors import KernelError, PrivilegeError
from mptcp_proxy.kernel import privileges
from mptcp_proxy.kernel.privileges import (
    Need, Privileges, bind_denied_hint, can_create_in, can_write_sysctl, describe,
    missing_capabilities, port_needs, require, unmet,
)

ALL = "000001ffffffffff"
NET_ADMIN = f"{1 << 12:016x}"
NET_RAW = f"{1 << 13:016x}"


def status(uid: int = 0, eff: str = ALL, amb: str = "0" * 16, bnd: str = ALL) -> str:
    """The lines of /proc/PID/status that matter, as the kernel writes them."""
    return (f"Name:\tpython3\nUmask:\t0022\nState:\tR (running)\n"
            f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
            f"CapInh:\t0000000000000000\nCapPrm:\t{eff}\nCapEff:\t{eff}\n"
            f"CapBnd:\t{bnd}\nCapAmb:\t{amb}\nNoNewPrivs:\t0\n")


ROOT = status()
NOBODY = status(65534, eff="0" * 16, bnd=ALL)
NOBODY_NET_ADMIN_AMBIENT = status(65534, eff=NET_ADMIN, amb=NET_ADMIN)
NOBODY_NET_ADMIN_FILE_CAP = status(65534, eff=NET_ADMIN)          # setcap: not ambient
ROOT_WITHOUT_CAPS = status(0, eff="0" * 16, bnd="0" * 16)          # capsh --drop=all


def test_parse_reads_uid_and_the_capability_sets():
    p = Privileges.parse(status(1000, eff=NET_ADMIN, amb=NET_RAW, bnd=ALL))
    assert (p.euid, p.effective, p.ambient, p.bounding) == (1000, 1 << 12, 1 << 13,
                                                            int(ALL, 16))
    assert p.has("CAP_NET_ADMIN") and not p.has("CAP_NET_RAW") and not p.root


def test_parse_takes_the_effective_uid_not_the_real_one():
    text = ROOT.replace("Uid:\t0\t0\t0\t0", "Uid:\t1000\t0\t0\t0")
    assert Privileges.parse(text).root


@pytest.mark.parametrize("text", ["", "garbage", "CapEff:\tzz\nUid:\tx\n"])
def test_a_status_without_the_lines_means_no_privileges(text):
    p = Privileges.parse(text)
    assert p.effective == 0 and not p.root
    assert missing_capabilities(["CAP_NET_ADMIN"], text) == ["CAP_NET_ADMIN"]


def test_missing_capabilities_in_the_order_given():
    names = ["CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN",
             "CAP_DAC_OVERRIDE"]
    assert missing_capabilities(names, ROOT) == []
    assert missing_capabilities(names, NOBODY) == names
    assert missing_capabilities(names, NOBODY_NET_ADMIN_AMBIENT) == \
        ["CAP_NET_RAW", "CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE"]
    with pytest.raises(ValueError):
        missing_capabilities(["CAP_FLY"], ROOT)


def test_programs_it_runs_need_the_capability_ambient_unless_root():
    """nft and ip get the ambient set after execve (the bounding set as root)."""
    assert missing_capabilities(["CAP_NET_ADMIN"], NOBODY_NET_ADMIN_AMBIENT, children=True) == []
    assert missing_capabilities(["CAP_NET_ADMIN"], NOBODY_NET_ADMIN_FILE_CAP) == []
    assert missing_capabilities(["CAP_NET_ADMIN"], NOBODY_NET_ADMIN_FILE_CAP,
                                children=True) == ["CAP_NET_ADMIN"]
    assert missing_capabilities(["CAP_NET_ADMIN"], ROOT, children=True) == []
    assert missing_capabilities(["CAP_NET_ADMIN"], ROOT_WITHOUT_CAPS,
                                children=True) == ["CAP_NET_ADMIN"]


def test_the_current_process_is_read_from_proc():
    p = Privileges.current()
    assert p.euid == os.geteuid()
    assert missing_capabilities(["CAP_NET_ADMIN"]) == \
        missing_capabilities(["CAP_NET_ADMIN"], open("/proc/self/status").read())


NEEDS = [Need("CAP_NET_ADMIN", "for its nftables table", children=True)]


def test_describe_says_what_is_missing_why_and_that_nothing_changed():
    assert describe("transparent", NEEDS, ROOT) is None
    line = describe("transparent", NEEDS, NOBODY)
    assert line == ("transparent needs CAP_NET_ADMIN (for its nftables table): run it as "
                    "root; nothing was changed")
    assert "\n" not in line


def test_describe_a_root_without_the_capability_and_the_ambient_case():
    line = describe("transparent", NEEDS, ROOT_WITHOUT_CAPS)
    assert "which this root process lacks" in line and "run it as root" not in line
    line = describe("transparent", NEEDS, NOBODY_NET_ADMIN_FILE_CAP)
    assert "ambient" in line and "AmbientCapabilities=CAP_NET_ADMIN" in line


def test_describe_lists_every_missing_need_once_with_advice():
    needs = NEEDS + [Need("CAP_NET_BIND_SERVICE", "--listen port 80 is below 1024")]
    line = describe("convert", needs, NOBODY, advice="or pass --no-sysctl")
    assert line.count("CAP_NET_ADMIN") == 1 and "CAP_NET_BIND_SERVICE (--listen port 80" in line
    assert line.endswith("run it as root, or pass --no-sysctl; nothing was changed")
    assert unmet(needs, NOBODY_NET_ADMIN_AMBIENT) == needs[1:]


def test_require_raises_a_privilege_error_which_is_a_kernel_error():
    require("transparent", NEEDS, ROOT)
    with pytest.raises(PrivilegeError) as info:
        require("transparent", NEEDS, NOBODY)
    assert isinstance(info.value, KernelError)
    assert str(info.value).startswith("transparent needs CAP_NET_ADMIN")


def test_privileged_ports(monkeypatch, tmp_path):
    start = tmp_path / "ip_unprivileged_port_start"
    start.write_text("1024\n")
    monkeypatch.setattr(privileges, "UNPRIVILEGED_PORT_START", start)
    assert port_needs(0, "--listen") == [] and port_needs(1024, "--listen") == []
    [need] = port_needs(80, "--listen")
    assert need.capability == "CAP_NET_BIND_SERVICE" and "--listen port 80" in need.why
    assert "CAP_NET_BIND_SERVICE" in bind_denied_hint(443) and bind_denied_hint(8080) == ""
    start.write_text("0\n")           # the sysctl lowered: every port is anyone's
    assert port_needs(80, "--listen") == [] and bind_denied_hint(80) == ""


def test_file_rights_are_the_kernels_answer(tmp_path):
    writable = tmp_path / "sysctl"
    writable.write_text("1\n")
    assert can_write_sysctl(writable) and writable.read_text() == "1\n"   # nothing written
    assert can_write_sysctl(tmp_path / "missing")    # the caller's error says it is missing
    assert can_create_in(tmp_path / "a" / "b")       # created later in an existing parent
    assert not can_create_in(privileges.Path("/proc/1/new"))   # nobody creates files there
