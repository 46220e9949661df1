"""`glucoagent-backend command DEVICE TYPE [key=value ...]`: send one signed command and wait for its result.

Exit status: 0 when the box reports ``ok``; 1 when it reports ``failed`` or ``refused``;
the ResultTimeout code (45) when no result came in time (the broker still holds the
command for an offline box until it expires); other errors as their class says.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.wire.command import COMMANDS


def cmd_command(args: argparse.Namespace) -> int:
    from agent.wire.result import Result
    from backend.clouds.adapter import adapter_for
    from backend.commands import CommandClient, parse_args, result_json, sign_command
    from backend.home import BackendHome
    from backend.mqtt_client import link_settings

    home = BackendHome(args.home)
    home.ensure()
    cmd_args = parse_args(args.type, args.args)
    cmd_id, envelope = sign_command(home.command_key, args.device, args.type, cmd_args, ttl_s=args.ttl)
    print(f"command {cmd_id}: {args.type} -> {args.device}", file=sys.stderr)

    def progress(result: Result) -> None:
        print(f"  {result.status}: {result.code} ({result.message})", file=sys.stderr)

    db = home.db()
    try:
        settings = link_settings(args.host, args.port, home.backend_tls())
        with CommandClient(db, settings, adapter_for(args.cloud)) as client:
            result = client.send(
                args.device, envelope, cmd_id, args.type, timeout_s=args.timeout, progress=progress, ttl_s=args.ttl
            )
    finally:
        db.close()
    print(result_json(result))
    return 0 if result.status == "ok" else 1


def add_parser(subparsers: Any, home_default: Path) -> None:
    p = subparsers.add_parser(
        "command",
        help="send a signed command to a box and wait for its signed result",
        description="Types and arguments: "
        + "; ".join(
            f"{t} {' '.join(f'{a}=' + s.kind.__name__ for a, s in spec.items())}".strip()
            for t, spec in COMMANDS.items()
        ),
    )
    p.add_argument("device", metavar="DEVICE", help="device id, e.g. gd-0123456789ab")
    p.add_argument("type", metavar="TYPE", choices=sorted(COMMANDS), help="command type")
    p.add_argument("args", metavar="KEY=VALUE", nargs="*", help="command arguments")
    p.add_argument("--home", type=Path, default=home_default)
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds the command stays valid (default 3600)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the result (default 60)")
    p.add_argument(
        "--cloud", default="glucoagent", choices=("glucoagent", "azure", "aws"),
        help="the cloud the box uses: on aws the command goes as a job (CreateJob through the bridge); docs/clouds.md",
    )  # fmt: skip
    p.set_defaults(func=cmd_command)
