"""What every test shares."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_exec_in_the_test_process(monkeypatch):
    """``lab exec`` replaces its process with the command (os.execvpe). Called
    in-process by a test, it would replace pytest itself, and the command's
    exit status would become the suite's: a green run that ran nothing after
    it. Tests run it as a subprocess; this makes an in-process call fail."""
    def refuse(*args, **kwargs):
        raise AssertionError("os.exec* called inside the test process: run the CLI as a "
                             "subprocess (lab exec replaces its process)")
    for name in ("execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp",
                 "execlpe"):
        monkeypatch.setattr(os, name, refuse)
