"""``wire/`` and ``modes/`` stay pure: no sockets, no event loop, no clock, no logging, no OS.

Every module under ``mptcp_proxy/wire`` and ``mptcp_proxy/modes`` (and the two
modules they may lean on, ``mptcp_proxy/__init__`` and ``mptcp_proxy/errors``)
is parsed with ``ast``; every import, at any depth (functions and
``TYPE_CHECKING`` blocks included), must name an allow-listed standard-library
module or one of the pure package modules. A dynamic ``__import__`` fails too.

To allow another stdlib module, add it to ``PURE_STDLIB`` with the reason it
touches no I/O, clock, entropy or process state.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

import mptcp_proxy

PACKAGE = "mptcp_proxy"
PACKAGE_DIR = Path(mptcp_proxy.__file__).resolve().parent
PURE_PACKAGES = ("wire", "modes")

# Standard-library modules that compute only: no I/O, clock, entropy, threads
# or process state. Names are exact: "http" is allowed (HTTPStatus), "http.client"
# is not (it opens sockets).
PURE_STDLIB = frozenset({
    "__future__", "abc", "array", "base64", "binascii", "bisect", "codecs",
    "collections", "collections.abc", "dataclasses", "enum", "functools",
    "hashlib", "hmac", "heapq", "http", "ipaddress", "itertools", "math",
    "numbers", "operator", "re", "string", "struct", "textwrap", "types",
    "typing", "unicodedata", "zlib",
})

# Named here so a failure explains itself; anything outside PURE_STDLIB fails anyway.
FORBIDDEN_STDLIB = frozenset({
    "socket", "asyncio", "selectors", "select", "ssl", "logging", "time",
    "datetime", "threading", "multiprocessing", "concurrent", "subprocess",
    "os", "sys", "signal", "random", "secrets", "io", "pathlib", "shutil",
    "tempfile", "importlib",
})

# The package modules pure code may import, with their submodules.
PURE_INTERNAL_PREFIXES = (f"{PACKAGE}.wire", f"{PACKAGE}.modes")
PURE_INTERNAL_EXACT = frozenset({PACKAGE, f"{PACKAGE}.errors"})


@dataclass(frozen=True)
class Violation:
    line: int
    module: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.module}: {self.reason}"


def module_name_for(path: Path) -> str:
    """Dotted name of a source file inside the package."""
    parts = list(path.resolve().relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve_relative(module_name: str, is_package: bool, level: int,
                     target: str | None) -> str:
    """Absolute name for ``from <level dots><target> import ...`` inside ``module_name``."""
    base = module_name.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def is_submodule(name: str) -> bool:
    """True if ``name`` is an importable module (used for ``from X import Y``)."""
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:  # noqa: BLE001 - a parent that fails to import: judge the parent
        return False


def judge(name: str) -> str | None:
    """Why importing ``name`` breaks purity, or None."""
    top = name.split(".")[0]
    if top == PACKAGE:
        if name in PURE_INTERNAL_EXACT or any(
                name == prefix or name.startswith(prefix + ".")
                for prefix in PURE_INTERNAL_PREFIXES):
            return None
        return "only mptcp_proxy.wire, mptcp_proxy.modes and mptcp_proxy.errors are pure"
    if name in PURE_STDLIB:
        return None
    if top in FORBIDDEN_STDLIB:
        return f"{top} is I/O, clock, entropy or process state"
    return "not in the pure standard-library allow-list"


def imported_names(tree: ast.AST, module_name: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module name the source imports, with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = resolve_relative(module_name, is_package, node.level, node.module)
            else:
                base = node.module or ""
            # ``from mptcp_proxy import dataplane`` imports a submodule: judge
            # that; a plain name (``from struct import Struct``) judges the module.
            submodules = [f"{base}.{alias.name}" for alias in node.names
                          if alias.name != "*" and is_submodule(f"{base}.{alias.name}")]
            if submodules:
                found.extend((node.lineno, name) for name in submodules)
            if len(submodules) < len(node.names) or base in PURE_INTERNAL_EXACT:
                found.append((node.lineno, base))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__"):
            found.append((node.lineno, "__import__()"))
    return found


def check_source(source: str, module_name: str, is_package: bool = False) -> list[Violation]:
    tree = ast.parse(source)
    violations = []
    for line, name in imported_names(tree, module_name, is_package):
        if name == "__import__()":
            violations.append(Violation(line, name, "dynamic import"))
            continue
        reason = judge(name)
        if reason is not None:
            violations.append(Violation(line, name, reason))
    return violations


def pure_source_files() -> list[Path]:
    files = [PACKAGE_DIR / "__init__.py", PACKAGE_DIR / "errors.py"]
    for package in PURE_PACKAGES:
        files.extend(sorted((PACKAGE_DIR / package).rglob("*.py")))
    return files


@pytest.mark.parametrize("path", pure_source_files(),
                         ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_module_imports_only_pure_modules(path: Path) -> None:
    violations = check_source(path.read_text(encoding="utf-8"), module_name_for(path),
                              is_package=path.name == "__init__.py")
    assert not violations, f"{path.relative_to(PACKAGE_DIR)} is not pure:\n" + "\n".join(
        str(v) for v in violations)


def test_the_walk_finds_the_codecs() -> None:
    names = {module_name_for(path) for path in pure_source_files()}
    assert f"{PACKAGE}.wire" in names
    assert f"{PACKAGE}.wire.convert" in names
    assert f"{PACKAGE}.modes" in names
    assert f"{PACKAGE}.errors" in names


# The checker itself: it must catch what it claims to catch.

@pytest.mark.parametrize("source", [
    "import socket",
    "import asyncio",
    "from selectors import DefaultSelector",
    "import logging",
    "from time import monotonic",
    "import threading",
    "import subprocess",
    "import os.path",
    "from os import path",
    "import sys",
    "import random",
    "from http import client",
    "import importlib",
    "__import__('socket')",
    "def f():\n    import socket\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio\n",
    "from mptcp_proxy.dataplane import relay",
    "from mptcp_proxy import dataplane",
    "import mptcp_proxy.server",
    "from ..dataplane import relay",
    "from .. import kernel",
    "import numpy",
])
def test_checker_rejects(source: str) -> None:
    assert check_source(source, f"{PACKAGE}.wire.example"), source


@pytest.mark.parametrize("source", [
    "from __future__ import annotations",
    "import struct",
    "import collections.abc",
    "from collections.abc import Iterable",
    "from dataclasses import dataclass",
    "from http import HTTPStatus",
    "import ipaddress, enum",
    "from mptcp_proxy.errors import ProtocolError",
    "from mptcp_proxy import errors",
    "from mptcp_proxy.wire.convert import ConvertMessage",
    "from mptcp_proxy.wire import convert",
    "from . import convert",
    "from .convert import ConvertMessage",
    "from ..errors import ProtocolError",
    "from .. import errors",
    "from ..modes import example",
])
def test_checker_accepts(source: str) -> None:
    assert not check_source(source, f"{PACKAGE}.wire.example"), source


def test_relative_imports_resolve_from_a_package_init() -> None:
    assert resolve_relative(f"{PACKAGE}.wire", True, 1, "convert") == f"{PACKAGE}.wire.convert"
    assert resolve_relative(f"{PACKAGE}.wire", True, 2, "errors") == f"{PACKAGE}.errors"
    assert resolve_relative(f"{PACKAGE}.wire.convert", False, 1, None) == f"{PACKAGE}.wire"
    assert check_source("from ..dataplane import relay", f"{PACKAGE}.wire", is_package=True)
    assert not check_source("from .convert import X", f"{PACKAGE}.wire", is_package=True)
