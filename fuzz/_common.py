"""Shared helpers of the fuzz targets (see fuzz/run.py).

A target module defines ``NAME``, ``one_input(data: bytes)`` and ``seeds()``.
``one_input`` swallows the *expected* rejections of its codec (the documented
ProtocolError subclasses, NeedMoreData, SockInfoError, ValueError where the
API documents it); anything else escapes and is a crash. Oracles that a
codec documents (prefix monotonicity, decode/encode round trips) raise
``FuzzFinding``: also a crash.
"""

from __future__ import annotations

import random
import sys
from typing import Callable, Iterator


class FuzzFinding(AssertionError):
    """A documented property of a codec does not hold for this input."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise FuzzFinding(message)


def split(data: bytes) -> tuple[int, bytes]:
    """First byte: the chunking seed; the rest: the payload."""
    return (data[0], data[1:]) if data else (0, b"")


def chunks(seed: int, payload: bytes) -> Iterator[bytes]:
    """Split ``payload`` into pieces chosen by ``seed``: 0 = byte by byte,
    otherwise random sizes 1..seed (deterministic, so a crash replays)."""
    if seed == 0:
        for i in range(len(payload)):
            yield payload[i:i + 1]
        return
    rng = random.Random(seed)
    pos = 0
    while pos < len(payload):
        n = rng.randint(1, max(1, seed))
        yield payload[pos:pos + n]
        pos += n


def same_whole_and_chunked(run: Callable[[list[bytes]], object], payload: bytes,
                           seed: int) -> None:
    """``run`` gives the same answer for ``payload`` in one piece and in the
    pieces ``seed`` picks: how the bytes were segmented must never matter."""
    whole = run([payload] if payload else [])
    chunked = run(list(chunks(seed, payload)))
    check(whole == chunked, f"chunked {chunked!r} != whole {whole!r}")


def main(one_input: Callable[[bytes], None]) -> None:
    """libFuzzer entry point under atheris (``python fuzz/fuzz_X.py [libFuzzer args]``)."""
    import atheris
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


def instrumented() -> object:
    """Context manager instrumenting the package imports for coverage, only when a
    target runs as the fuzzing script (unit tests import the targets plain)."""
    import contextlib
    import os
    if not os.path.basename(sys.argv[0]).startswith("fuzz_"):
        return contextlib.nullcontext()
    import atheris
    return atheris.instrument_imports(include=["mptcp_proxy"])
