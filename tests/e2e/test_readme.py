"""The README's runnable blocks, run as a user would paste them.

Blocks marked ``<!-- runnable -->`` run under ``bash -e`` with the virtualenv's
``bin`` first on PATH (as after ``. .venv/bin/activate``). Each gets a lab of
its own: the README's lab ``try`` (addresses 10.172.x.y, fd00:172::) and its
``/tmp/try.*`` files are renamed to a unique lab and a temporary directory, so
the test never touches a lab a person made.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mptcp_proxy.lab.topology import canonical_name, subnet_octet

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARK = "<!-- runnable -->"


def runnable_blocks(text: str) -> list[str]:
    blocks = []
    for match in re.finditer(re.escape(MARK) + r"\s*```sh\n(.*?)```", text, re.S):
        blocks.append(match.group(1))
    return blocks


def localize(block: str, name: str, tmp: Path) -> str:
    """The README's lab ``try`` becomes lab ``name``, its files go to ``tmp``."""
    k = subnet_octet(canonical_name(name))
    block = block.replace("/tmp/try.", f"{tmp}/try.").replace("--directory /tmp",
                                                               f"--directory {tmp}")
    block = re.sub(r"\b10\.172\.", f"10.{k}.", block)
    block = block.replace("fd00:172:", f"fd00:{k}:")
    return re.sub(r"(lab (?:up --name|exec|down|show)) try\b", rf"\1 {name}", block)


def test_the_readme_has_runnable_blocks():
    assert len(runnable_blocks(README.read_text())) >= 1


@pytest.mark.parametrize("index", range(len(runnable_blocks(README.read_text()))))
def test_runnable_readme_block(index, tmp_path):
    block = runnable_blocks(README.read_text())[index]
    name = f"rd{uuid.uuid4().hex[:6]}"
    script = localize(block, name, tmp_path)
    assert name in script and "10.172." not in script   # nothing left pointing at "try"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    try:
        proc = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)
    finally:
        subprocess.run([sys.executable, "-m", "mptcp_proxy", "lab", "down", name],
                       capture_output=True, timeout=60)
    assert proc.returncode == 0, f"README block {index} failed:\n{script}\n{proc.stderr[-3000:]}"
    if "cmp " in script:
        assert "byte-exact" in proc.stdout, proc.stdout
