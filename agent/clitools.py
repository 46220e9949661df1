"""What every command line of the project does with a parsed command: run it, and turn an
expected failure into one line on stderr and its exit code (never a traceback)."""

from __future__ import annotations

import argparse
import os
import sys

from agent.errors import GlucoagentError
from drivers.errors import DriverError


def dispatch(args: argparse.Namespace, prog: str) -> int:
    """Run ``args.func(args)``; an agent or driver error -> ``PROG: error: ...`` and its class's exit code
    (20 for a meter or pen reader that failed, 10 for a driver's bad input such as an unknown protocol)."""
    try:
        return int(args.func(args))
    except (GlucoagentError, DriverError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
