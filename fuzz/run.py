#!/usr/bin/env python3
"""Run the coverage-guided fuzz targets (atheris/libFuzzer), each for a time budget.

    python fuzz/run.py [--seconds 60] [--runs N] [target ...]

Each target runs in its own subprocess (``fuzz/fuzz_<target>.py``) with its
corpus in ``fuzz/corpus/<target>/`` (seeded from the codecs' encoders each
run; git-ignored) and crash inputs written to ``fuzz/crashes/<target>/``.
libFuzzer stops at the first crash; the target is then restarted for the
rest of its budget, so one run can collect several crashes. Turn every crash
into a test in tests/unit/test_fuzz_regressions.py, then delete the file.
Exit status 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ("wire_convert", "convert_handshake", "socks5", "http_connect", "dns", "sockinfo")
MAX_RESTARTS = 20


def write_seeds(target: str, corpus: str) -> int:
    sys.path.insert(0, HERE)
    module = __import__(f"fuzz_{target}")
    seeds = module.seeds()
    for seed in seeds:
        name = "seed-" + hashlib.sha1(seed).hexdigest()[:16]
        with open(os.path.join(corpus, name), "wb") as f:
            f.write(seed)
    return len(seeds)


def run_target(target: str, seconds: int, runs: int, max_len: int, verbose: bool) -> dict:
    corpus = os.path.join(HERE, "corpus", target)
    crashes = os.path.join(HERE, "crashes", target)
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    write_seeds(target, corpus)
    before = set(os.listdir(crashes))
    execs, restarts, started = 0, 0, time.monotonic()
    while True:
        left = seconds - (time.monotonic() - started)
        if left < 1 or (runs and execs >= runs) or restarts > MAX_RESTARTS:
            break
        cmd = [sys.executable, os.path.join(HERE, f"fuzz_{target}.py"), corpus,
               f"-max_total_time={int(left)}", f"-max_len={max_len}", "-timeout=10",
               "-rss_limit_mb=2048", "-print_final_stats=1",
               f"-artifact_prefix={crashes}{os.sep}"]
        if runs:
            cmd.append(f"-runs={runs - execs}")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace")
        if verbose:
            sys.stdout.write(proc.stdout)
        m = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stdout)
        if m:
            execs += int(m.group(1))
        else:  # a crash before the final stats: take the last progress line
            progress = re.findall(r"^#(\d+)\s", proc.stdout, re.M)
            execs += int(progress[-1]) if progress else 0
        if proc.returncode == 0:
            break
        restarts += 1
        tail = [line for line in proc.stdout.splitlines()
                if "Error" in line or "Finding" in line or "Exception" in line]
        print(f"  [{target}] crash (exit {proc.returncode}): {tail[-1] if tail else '?'}",
              flush=True)
    new = sorted(set(os.listdir(crashes)) - before)
    return {"target": target, "execs": execs, "seconds": time.monotonic() - started,
            "crashes": new, "corpus": len(os.listdir(corpus))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--seconds", type=int, default=60, help="budget per target (default 60)")
    parser.add_argument("--runs", type=int, default=0, help="stop a target after N inputs")
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("-v", "--verbose", action="store_true", help="show libFuzzer output")
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
    results = []
    for target in args.targets or TARGETS:
        print(f"fuzzing {target} for {args.seconds}s ...", flush=True)
        result = run_target(target, args.seconds, args.runs, args.max_len, args.verbose)
        results.append(result)
        print(f"  {target}: {result['execs']} inputs in {result['seconds']:.0f}s, "
              f"corpus {result['corpus']}, crashes {len(result['crashes'])}", flush=True)
    print(f"\n{'target':<20}{'inputs':>12}{'seconds':>9}{'inputs/s':>10}{'crashes':>9}")
    for r in results:
        rate = r["execs"] / r["seconds"] if r["seconds"] else 0
        print(f"{r['target']:<20}{r['execs']:>12}{r['seconds']:>9.0f}{rate:>10.0f}"
              f"{len(r['crashes']):>9}")
        for name in r["crashes"]:
            print(f"    fuzz/crashes/{r['target']}/{name}")
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
