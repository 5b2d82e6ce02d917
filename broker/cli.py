"""``zchat-broker``: command line, environment, logging and signals around :class:`Broker`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import zmq

from broker.server import PUB_SNDHWM, Broker, Config
from broker.store import Store, StoreError, default_data_dir
from zchat import __version__

log = logging.getLogger("zchat.broker")
#: Start, ready and stop lines are shown whatever --log-level says: an operator
#: (and a test) must always learn where the broker listens and when it is gone.
lifecycle = logging.getLogger("zchat.broker.lifecycle")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"zchat-broker: {name}={value!r} is not a number") from None


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0 picks a free one)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zchat-broker",
        description="Run the zchat broker: clients send to --port (ROUTER) and listen on --pub-port (PUB).",
        epilog="Each setting also reads an environment variable, named in brackets; a flag wins over it.",
    )
    parser.add_argument(
        "--host", default=os.environ.get("ZCHAT_HOST", "0.0.0.0"), help="address to bind (ZCHAT_HOST; default 0.0.0.0)"
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=_env_int("ZCHAT_PORT", 5555),
        help="ROUTER port for requests and replies; 0 picks a free port (ZCHAT_PORT; default 5555)",
    )
    parser.add_argument(
        "--pub-port",
        type=_port,
        default=_env_int("ZCHAT_PUB_PORT", 5556),
        help="PUB port for room events; 0 picks a free port (ZCHAT_PUB_PORT; default 5556)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ["ZCHAT_DATA"]) if os.environ.get("ZCHAT_DATA") else None,
        help=f"directory of the message store (ZCHAT_DATA; default {default_data_dir()})",
    )
    parser.add_argument(
        "--heartbeat-ms",
        type=int,
        default=_env_int("ZCHAT_HEARTBEAT_MS", 5000),
        help="clients ping this often; a session silent for 3x this is ended (ZCHAT_HEARTBEAT_MS; default 5000)",
    )
    parser.add_argument(
        "--durability",
        choices=("full", "normal"),
        default=os.environ.get("ZCHAT_DURABILITY", "full"),
        help="full: an ack means the message is fsynced to disk; normal: it survives a crash of the broker "
        "but maybe not of the machine, and is faster (ZCHAT_DURABILITY; default full)",
    )
    parser.add_argument(
        "--pub-hwm",
        type=int,
        default=_env_int("ZCHAT_PUB_HWM", PUB_SNDHWM),
        help="room events queued per subscriber before a slow one loses live events, which it then "
        f"fetches from history; bounds the broker's memory (ZCHAT_PUB_HWM; default {PUB_SNDHWM})",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("ZCHAT_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
        help="(ZCHAT_LOG_LEVEL; default info)",
    )
    parser.add_argument("--version", action="version", version=f"zchat-broker {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    lifecycle.setLevel(logging.INFO)
    if args.heartbeat_ms < 100:
        log.error("--heartbeat-ms must be at least 100")
        return 2
    data_dir: Path = args.data or default_data_dir()
    config = Config(
        host=args.host,
        port=args.port,
        pub_port=args.pub_port,
        data_dir=data_dir,
        heartbeat_ms=args.heartbeat_ms,
        durability=args.durability,
        pub_hwm=args.pub_hwm,
    )
    try:
        store = Store(data_dir, config.durability)
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    try:
        broker = Broker(config, store)
    except zmq.ZMQError as exc:
        log.error("cannot listen on %s ports %d/%d: %s", args.host, args.port, args.pub_port, exc.strerror)
        store.close()
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        lifecycle.info("%s received, shutting down", signal.Signals(signum).name)
        broker.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.warning("traffic is unauthenticated and unencrypted: expose these ports only to a trusted network")
    lifecycle.info(
        "zchat-broker %s ready: requests on %s, room events on %s, store %s, epoch %s",
        __version__,
        broker.endpoint,
        broker.pub_endpoint,
        store.path,
        broker.core.epoch,
    )
    try:
        broker.run()
    except StoreError as exc:
        log.critical("%s; stopping so that nothing unstored is acknowledged", exc)
        return 1
    finally:
        store.close()
    lifecycle.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
