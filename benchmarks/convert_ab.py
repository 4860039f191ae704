"""Same-run A/B of converter code: forward, this tree's converter, another tree's.

    .venv/bin/python benchmarks/convert_ab.py --other DIR [--reps N] [--duration S]
        [--scenarios f,c,c0] [--env NAME=VALUE ...]

For performance work on the converter, where run-to-run spread (0.83-0.96 for
the same code in ``convert.py``) is larger than most single changes. Builds
the ``convert.py`` lab (one unshaped path, the conn-server, ``forward``,
``convert`` and the floor converter of this tree) and adds a second converter
started from ``DIR/src`` (a checkout of another commit: ``git worktree add
--detach /tmp/base HEAD~1``) on its own port; the c=64 runs of every
scenario are interleaved repetition by repetition, so both converters see the
same machine. ``--env`` passes variables to the other converter only (an
experiment switched by an environment variable). Prints connections/s and
proxy CPU us per connection per run, their medians and the ratios to
``forward``. Every connection's bytes are checked as in ``convert.py``; a
failed connection fails the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import convert as cb  # noqa: E402
from mptcp_proxy.lab import Lab, PathSpec  # noqa: E402
from relay import BenchError, Procs, wait_listening  # noqa: E402

OTHER_PORT = 7102


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", required=True, type=Path, help="root of the other checkout")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--scenarios", default="f,c", help="of convert.py's, besides cB (f,c,c0)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    args = ap.parse_args()
    if not (args.other / "src" / "mptcp_proxy").is_dir():
        ap.error(f"{args.other}/src/mptcp_proxy: no such package")
    scenarios = [cb.BY_KEY[k] for k in args.scenarios.split(",")]
    other = cb.Scenario("cB", "(cB) other tree", "convertB", "syn")
    procs = Procs(Path(tempfile.mkdtemp(prefix="convert-ab-")))
    runs: dict[str, list[tuple[float, float]]] = {}
    try:
        with Lab.create(paths=[PathSpec(rate_mbit=None)]) as lab:
            bench = cb.Bench(lab, procs, argparse.Namespace(parse="memo"))
            bench.start()
            argv = ["env", f"PYTHONPATH={args.other.resolve() / 'src'}", *args.env,
                    *[f"0.0.0.0:{OTHER_PORT}" if a == f"0.0.0.0:{cb.CONVERT_PORT}" else a
                      for a in bench.argv["convert"]]]
            bench.proxies["convertB"] = procs.start(lab.proxy, argv, "convertB")
            wait_listening(bench.proxies["convertB"].pid, OTHER_PORT)
            connect_to = bench.connect_to
            bench.connect_to = lambda sc: (f"{lab.paths[0].proxy_addr}:{OTHER_PORT}"  # type: ignore[method-assign]
                                           if sc.proxy == "convertB" else connect_to(sc))
            for sc in (*scenarios, other):
                bench.run(sc, 8, 0.5, 1, warmup=True)
            for rep in range(args.reps):
                for sc in (*scenarios, other):
                    r = bench.run(sc, 64, args.duration, 2)
                    if r["errors"] > r["fin_missed"] or not r["completed"]:
                        raise BenchError(f"{sc.key}: {r['errors']} failed connections "
                                         f"{r['errors_by_kind']}")
                    us = r["proxy_cpu"] / r["completed"] * 1e6
                    runs.setdefault(sc.key, []).append((r["rate"], us))
                    print(f"rep {rep} {sc.key:3s} {r['rate']:6.0f}/s  proxy CPU {us:5.1f} us "
                          "per connection", flush=True)
            # SIGTERM, not SIGKILL: the converters give back their sysctl records.
            for name in ("convert", "convertB"):
                bench.proxies[name].stop(timeout=cb.DRAIN_WAIT)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.kill_all()
    base = statistics.median(rate for rate, _ in runs["f"]) if "f" in runs else None
    for key, values in runs.items():
        rate = statistics.median(r for r, _ in values)
        cpu = statistics.median(u for _, u in values)
        ratio = f"  {key}/f {rate / base:.3f}" if base and key != "f" else ""
        print(f"{key:3s} median {rate:6.0f}/s  CPU {cpu:5.1f} us per connection{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
