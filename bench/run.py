"""`make bench`: every benchmark, one table, written to docs/performance.md.

Each figure is measured against a baseline in the same run, so a slow or busy
machine moves both sides; ratios and goals are what to read, not raw numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from bench.table import Row

MODULES = (
    "bench.bench_drivers",
    "bench.bench_store",
    "bench.bench_uplink",
    "bench.bench_ingest",
    "bench.bench_memory",
    "bench.bench_duty",
    "bench.bench_openwrt",
    "bench.bench_ble",
    "bench.bench_update",
)
DOC = Path("docs/performance.md")


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| figure | ours | baseline | ratio | goal | met? |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        base = _fmt(r.baseline) + (f" ({r.baseline_name})" if r.baseline_name else "")
        met = {True: "yes", False: "**no**", None: "report"}[r.met]
        lines.append(f"| {r.figure} | {_fmt(r.ours)} | {base} | {_fmt(r.ratio)} | {r.goal} | {met} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--only", help="comma-separated module names (e.g. bench_store)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/performance.md alone")
    args = parser.parse_args(argv)
    wanted = [m for m in MODULES if not args.only or m.rsplit(".", 1)[1] in args.only.split(",")]
    rows: list[Row] = []
    failures: list[str] = []
    t0 = time.monotonic()
    for name in wanted:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that benchmark does not exist (yet)
            raise
        print(f"bench: {name} ...", flush=True)
        try:
            rows.extend(module.run())
        except Exception:  # one broken benchmark must not hide the others
            failures.append(name)
            traceback.print_exc()
    out = table(rows)
    print("\n" + out)
    elapsed = time.monotonic() - t0
    if not args.no_write and not args.only:
        notes = (
            DOC.read_text().split("<!-- notes -->", 1)[1]
            if DOC.exists() and "<!-- notes -->" in DOC.read_text()
            else ""
        )
        DOC.write_text(
            "# Performance\n\n"
            f"Produced by `make bench` on {dt.date.today().isoformat()} ({elapsed:.0f} s), on {machine()}.\n"
            "Every baseline is measured in the same run; read the ratios.\n\n"
            f"{out}\n\n<!-- notes -->{notes or chr(10)}"
        )
        print(f"\nwritten to {DOC}")
    if failures:
        print(f"bench: FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
