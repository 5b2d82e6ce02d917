"""``python -m broker.health``: is a broker answering on its request port?

Used as the container's HEALTHCHECK. A DEALER sends one ``ping`` envelope
without saying ``hello`` first. The broker answers every request it can
address, so a live broker sends back an ``error`` envelope (code
``not_registered``): a valid envelope in return proves that the broker is up,
its loop is turning and it decodes the wire format. Exit status 0 then;
otherwise the reason goes to stderr and the status is 1.

A broker whose disk alarm is on (``--min-free``: it answers, but refuses room
messages until space is freed) says so in that answer (``alarm: "disk"``): the
check prints a line that says so and still exits 0. Restarting the broker would
free no space, and an orchestrator that replaces unhealthy containers would make
it flap, which the alarm is there to avoid.

A broker run with CURVE keys (``--keys DIR`` / ``ZCHAT_KEYS``) talks only to
authorized keys, so the check then connects with CURVE as the user whose
secret key is ``DIR/health.key_secret`` (made with ``zchat-keygen health``, its
``health.key`` copied into ``DIR/authorized/``). It reads the same
``ZCHAT_KEYS`` as the broker, so in a container it needs no flags.
"""

from __future__ import annotations

import argparse
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq

from broker.auth import BROKER_CERT, KeysError, load_public, load_secret
from zchat import envargs
from zchat import protocol as p
from zchat.protocol import ProtocolError

PING_ID = "health"
#: The user name of the health check's own key when the broker runs with keys.
HEALTH_USER = "health"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m broker.health",
        description="Exit 0 if a zchat broker answers a ping on its request port, else 1 (the reason on stderr). "
        "A broker whose disk alarm is on (it refuses room messages: --min-free) answers, so 0, with a line "
        "on stdout that says so.",
    )
    # Not ZCHAT_HOST: for the broker that is the address it binds (0.0.0.0 in the image).
    parser.add_argument(
        "--host",
        type=_host,
        default="127.0.0.1",
        help="broker host: a name or an address (IPv6 with or without brackets); no port (default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=envargs.port,
        default=envargs.default("ZCHAT_PORT", 5555),
        help="broker request port (default ZCHAT_PORT, else 5555)",
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    parser.add_argument(
        "--keys",
        type=_home_path,  # ZCHAT_KEYS=~/keys as the broker reads it (no shell expands systemd's ~)
        default=envargs.default("ZCHAT_KEYS", None),
        help="the broker's key directory: connect with CURVE as the user of KEYS/health.key_secret "
        "(ZCHAT_KEYS; default: no CURVE)",
    )
    parser.add_argument(
        "--key", type=_home_path, default=None, help="the secret key to connect with (default KEYS/health.key_secret)"
    )
    return parser


def _host(text: str) -> str:
    """``--host`` as the broker's own ``--host`` and the client's addresses take it: an
    IPv6 address in brackets too. Unchecked, ``[::1]`` and ``HOST:PORT`` became endpoints
    that never connect, and the check said "no answer ... (down or stuck)" about a broker
    that was serving."""
    host = p.bare_host(text)
    if host is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a host name or address (the port goes in --port; an IPv6 address "
            "may be in brackets: [::1])"
        )
    if not host:
        raise argparse.ArgumentTypeError("the host is empty")
    return host


def _home_path(text: str) -> Path:
    return Path(text).expanduser()


#: What the check prints (and exits 0) about a broker whose disk alarm is on.
DISK_ALARM_NOTE = (
    "healthy, but its disk alarm is on: it refuses room messages until space is freed on the file system "
    "of its --data (under --min-free; its log says how much is free)"
)


@dataclass(frozen=True)
class Answer:
    """What a ping found: ``problem`` when the broker is not healthy (why), else None;
    ``alarm`` what the broker said is wrong while it serves (``"disk"``), else None."""

    problem: str | None
    alarm: str | None = None


def probe(host: str, port: int, timeout: float, curve: tuple[bytes, bytes, bytes] | None = None) -> Answer:
    """Ping the broker at ``host:port``: whether it answered (see :class:`Answer`).

    ``curve`` is (our public key, our secret key, the broker's public key), z85.
    """
    endpoint = p.tcp_endpoint(host, port)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in host:  # an IPv6 address: libzmq connects to IPv4 only without it
            sock.setsockopt(zmq.IPV6, 1)
        try:
            if curve is not None:
                sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
            sock.connect(endpoint)
            sock.send(p.encode({"type": "ping", "id": PING_ID}))
            if not sock.poll(int(timeout * 1000)):
                if _refused(host, port, timeout):
                    # libzmq retries a refused connection without a word: this said "down or
                    # stuck", and an operator cannot tell a stopped broker from a hung one.
                    return Answer(
                        f"nothing listens at {endpoint} (connection refused): the broker is down, or listens "
                        "on another address or port (its --host and --port)"
                    )
                hint = (
                    " (is our key in the broker's authorized/?)"
                    if curve is not None
                    # A broker run with keys does not answer a connection without them.
                    else " (down or stuck; or run with --keys, then it answers only keys it knows: pass --keys DIR)"
                )
                return Answer(f"no answer from {endpoint} within {timeout:g} s{hint}")
            frame = sock.recv()
        finally:
            sock.close()
    except zmq.ZMQError as exc:
        return Answer(f"cannot reach {endpoint}: {exc.strerror}")
    finally:
        ctx.term()
    try:
        env = p.decode(frame, p.MAX_REPLY_BYTES)
    except ProtocolError as exc:
        return Answer(f"{endpoint} answered something that is not a zchat envelope: {exc.message}")
    if env.get("id") != PING_ID:
        return Answer(f"{endpoint} answered a {env['type']!r} envelope that does not echo our id")
    alarm = env.get("alarm")
    return Answer(None, alarm if isinstance(alarm, str) else None)


def _refused(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` is refused (nothing listens there). Asked
    only of a broker that did not answer: a healthy one is not given a second connection
    (a connect and a disconnect line in its log at every check)."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 1.0)):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def load_curve(keys: Path, key: Path | None) -> tuple[bytes, bytes, bytes]:
    """(our public, our secret, broker public) for a broker run with ``--keys keys``."""
    # The broker's public key: from broker.key where it is (anyone may read it), else
    # from the secret file (what a container that mounts the broker's directory has).
    public_file = keys / f"{BROKER_CERT}.key"
    if public_file.exists():
        broker_public = load_public(public_file)
    else:
        broker_public, _ = load_secret(keys / f"{BROKER_CERT}.key_secret")
    ours = key or keys / f"{HEALTH_USER}.key_secret"
    if key is None and not ours.exists():
        raise KeysError(
            f"the broker runs with keys ({keys}) but {ours} is missing: "
            f"run `zchat-keygen {HEALTH_USER} --dir {keys}` and copy {HEALTH_USER}.key into {keys}/authorized/"
        )
    public, secret = load_secret(ours)
    return public, secret, broker_public


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = envargs.resolve(parser, parser.parse_args(argv))
    if args.timeout <= 0:
        print("broker.health: --timeout must be positive", file=sys.stderr)
        return 2
    curve = None
    if args.keys is not None or args.key is not None:
        if args.keys is None:
            print("broker.health: --key needs --keys (the broker's public key is read from there)", file=sys.stderr)
            return 2
        try:
            curve = load_curve(args.keys, args.key)
        except KeysError as exc:
            print(f"broker.health: unhealthy: {exc}", file=sys.stderr)
            return 1
    answer = probe(args.host, args.port, args.timeout, curve)
    if answer.problem is not None:
        print(f"broker.health: unhealthy: {answer.problem}", file=sys.stderr)
        return 1
    if answer.alarm is not None:
        # On stdout: Docker keeps it in the health log (docker inspect) of a healthy container.
        note = DISK_ALARM_NOTE if answer.alarm == "disk" else f"healthy, but it reports an alarm: {answer.alarm[:64]!r}"
        print(f"broker.health: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
