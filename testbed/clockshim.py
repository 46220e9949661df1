"""A wall-clock shim for one process tree: moves CLOCK_REALTIME (not monotonic time), as a real clock
step does. Used by `make soak` and the clock-jump test; libfaketime does not work with Python 3.11
here (it either breaks time.sleep or hangs threading waits). Built with the system C compiler."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

CLOCK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

/* Wall-clock offset for one process tree: seconds in $SOAK_CLOCK_OFFSET_FILE, re-read every 0.2 s.
   Only CLOCK_REALTIME (and gettimeofday/time) move; monotonic clocks do not, as after a real step. */
typedef int (*cg_t)(clockid_t, struct timespec *);
static cg_t real_cg;
static _Atomic long long offset_ns;
static _Atomic long long read_at_ns = -1;

static cg_t real(void) {
    if (!real_cg) real_cg = (cg_t)dlsym(RTLD_NEXT, "clock_gettime");
    return real_cg;
}

static long long offset(void) {
    const char *path = getenv("SOAK_CLOCK_OFFSET_FILE");
    if (!path) return 0;
    struct timespec m;
    real()(CLOCK_MONOTONIC, &m);
    long long now = m.tv_sec * 1000000000LL + m.tv_nsec;
    long long last = atomic_load(&read_at_ns);
    if (last < 0 || now - last > 200000000LL) {
        atomic_store(&read_at_ns, now);
        FILE *f = fopen(path, "re");
        if (f) {
            double s;
            if (fscanf(f, "%lf", &s) == 1) atomic_store(&offset_ns, (long long)(s * 1e9));
            fclose(f);
        }
    }
    return atomic_load(&offset_ns);
}

int clock_gettime(clockid_t clk, struct timespec *ts) {
    int rc = real()(clk, ts);
    if (rc == 0 && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE || clk == CLOCK_TAI)) {
        long long t = ts->tv_sec * 1000000000LL + ts->tv_nsec + offset();
        ts->tv_sec = t / 1000000000LL;
        ts->tv_nsec = t % 1000000000LL;
    }
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    (void)tz;
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
"""


def build_clock_shim(directory: Path) -> Path:
    """Compile the shim into ``directory``; RuntimeError when no compiler is there or it fails."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler to build the wall-clock shim")
    src, out = directory / "clockshim.c", directory / "clockshim.so"
    src.write_text(CLOCK_SHIM)
    proc = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the shim did not build: {proc.stderr.strip()[:300]}")
    return out


def settime_command(offset_file: Path) -> str:
    """An ``agent.settime_command`` that steps the shimmed clock (instead of the system's) to ``{epoch}``."""
    return f"{sys.executable} -m testbed.clockshim {offset_file} {{epoch}}"


def step_to(offset_file: Path, epoch: float) -> float:
    """Move the shim's offset so the shimmed wall clock reads ``epoch`` now; returns the new offset.
    Runs under the shim itself (inherited LD_PRELOAD), so time.time() already includes the old offset."""
    try:
        old = float(offset_file.read_text().strip() or 0)
    except (OSError, ValueError):
        old = 0.0
    new = old + (epoch - time.time())
    tmp = offset_file.with_suffix(".tmp")
    tmp.write_text(f"{new:.3f}")
    tmp.replace(offset_file)
    return new


if __name__ == "__main__":
    step_to(Path(sys.argv[1]), float(sys.argv[2]))
