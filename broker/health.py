"""``python -m broker.health``: is a broker answering on its request port?

Used as the container's HEALTHCHECK. A DEALER sends one ``ping`` envelope
without saying ``hello`` first. The broker answers every request it can
address, so a live broker sends back an ``error`` envelope (code
``not_registered``): a valid envelope in return proves that the broker is up,
its loop is turning and it decodes the wire format. Exit status 0 then;
otherwise the reason goes to stderr and the status is 1.
"""

from __future__ import annotations

import argparse
import os
import sys

import zmq

from zchat import protocol as p
from zchat.protocol import ProtocolError

PING_ID = "health"


def _default_port() -> int:
    value = os.environ.get("ZCHAT_PORT")
    try:
        return int(value) if value else 5555
    except ValueError:
        raise SystemExit(f"broker.health: ZCHAT_PORT={value!r} is not a number") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m broker.health",
        description="Exit 0 if a zchat broker answers a ping on its request port, else 1.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=_default_port(), help="broker request port (default ZCHAT_PORT, else 5555)"
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    return parser


def probe(host: str, port: int, timeout: float) -> str | None:
    """Ping the broker at ``host:port``; ``None`` when it answered, else why not."""
    endpoint = f"tcp://{host}:{port}"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            sock.send(p.encode({"type": "ping", "id": PING_ID}))
            if not sock.poll(int(timeout * 1000)):
                return f"no answer from {endpoint} within {timeout:g} s"
            frame = sock.recv()
        finally:
            sock.close()
    except zmq.ZMQError as exc:
        return f"cannot reach {endpoint}: {exc.strerror}"
    finally:
        ctx.term()
    try:
        env = p.decode(frame, p.MAX_REPLY_BYTES)
    except ProtocolError as exc:
        return f"{endpoint} answered something that is not a zchat envelope: {exc.message}"
    if env.get("id") != PING_ID:
        return f"{endpoint} answered a {env['type']!r} envelope that does not echo our id"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("broker.health: --timeout must be positive", file=sys.stderr)
        return 2
    problem = probe(args.host, args.port, args.timeout)
    if problem is not None:
        print(f"broker.health: unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
