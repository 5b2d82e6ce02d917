"""``zchat-broker``: command line, environment, logging and signals around :class:`Broker`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import gc
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import zmq

from broker.auth import KeysError
from broker.backplane import DEFAULT_RETENTION, HAVE_REDIS, NO_REDIS, shown_url
from broker.backplane import Errors as BackplaneErrors
from broker.backplane import url_problem as backplane_url_problem
from broker.core import Limits
from broker.gate import GateError
from broker.server import (
    CONNECT_BURST,
    CONNECT_RATE,
    FD_MARGIN,
    MIN_FREE_BYTES,
    MIN_OPEN_FILES,
    PUB_SNDHWM,
    SOCKET_MAX_MSG_BYTES,
    Broker,
    Config,
    ListenLost,
    fit_open_files_limit,
)
from broker.store import DAY_MS, Store, StoreError, default_data_dir
from zchat import __version__, envargs
from zchat import protocol as p

log = logging.getLogger("zchat.broker")
#: The longest --heartbeat-ms: a session is held 3 heartbeats after its client went silent.
MAX_HEARTBEAT_MS = 3_600_000
#: Start, ready and stop lines are shown whatever --log-level says: an operator
#: (and a test) must always learn where the broker listens and when it is gone.
lifecycle = logging.getLogger("zchat.broker.lifecycle")
#: The longest --retention-days (a million days): beyond, the cutoff leaves SQLite's integers.
MAX_AGE_MS = 1_000_000 * DAY_MS
#: An open-file limit that holds fewer sessions than this is a warning even with the default
#: --max-sessions: a broker that turns away the clients of a small team is no small deployment.
FEW_SESSIONS = 100
#: Seconds after a SIGTERM or SIGINT after which a stop still under way logs every thread's stack.
STOP_STACKS_S = 5.0


_PORTS = "(an integer 0-65535; 0 picks a free one)"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number {_PORTS}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number {_PORTS}")
    return port


def _directory(text: str) -> Path:
    """--data and --keys: ``~`` is the home directory even where no shell expanded it
    (``--data=~/zchat``, systemd's ``Environment=ZCHAT_DATA=~/zchat``), and a relative
    path is made absolute, so that the log says where the directory is."""
    return Path(text).expanduser().absolute()


def _bind_host(value: str) -> str | None:
    """``--host`` as libzmq binds it: an IPv6 address may come in brackets (as clients
    write it); anything else with a colon (``HOST:PORT``, a client's ``ZCHAT_HOST``
    list) is no address to bind (None), and so is a list without ports (``a,b``): no
    host or interface has a comma in its name, and libzmq's "No such device" (exit 1)
    had a supervisor start the broker again and again on a setting that cannot work."""
    if "," in value:
        return None
    return p.bare_host(value) or None


def _alarm_text(floor: int) -> str:
    """The disk alarm's floor, for the ready line (see --min-free)."""
    return f"disk alarm under {floor / 1048576:g} MiB free" if floor > 0 else "disk alarm off"


def _variable(flag: str) -> str:
    """The environment variable of ``flag``: --max-text is ZCHAT_MAX_TEXT."""
    return "ZCHAT_" + flag[2:].upper().replace("-", "_")


DURABILITIES = ("full", "normal")
LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    parser = envargs.Parser(
        prog="zchat-broker",
        description="Run the zchat broker: clients send to --port (ROUTER) and listen on --pub-port (PUB).",
        epilog="Each setting also reads an environment variable, named in brackets; a flag wins over it.",
    )
    parser.add_argument(
        "--host",
        default=envargs.default("ZCHAT_HOST", "0.0.0.0"),
        help="address to bind, IPv4 or IPv6 (:: for every address of both), or a host or interface name; "
        "no port (ZCHAT_HOST; default 0.0.0.0)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=envargs.default("ZCHAT_PORT", 5555),
        help="ROUTER port for requests and replies; 0 picks a free port (ZCHAT_PORT; default 5555)",
    )
    parser.add_argument(
        "--pub-port",
        type=_port,
        default=envargs.default("ZCHAT_PUB_PORT", 5556),
        help="PUB port for room events; 0 picks a free port (ZCHAT_PUB_PORT; default 5556)",
    )
    parser.add_argument(
        "--data",
        type=_directory,
        default=envargs.default("ZCHAT_DATA", None),
        help=f"directory of the message store, one broker per directory (ZCHAT_DATA; default {default_data_dir()})",
    )
    parser.add_argument(
        "--heartbeat-ms",
        type=int,
        default=envargs.default("ZCHAT_HEARTBEAT_MS", 5000),
        help="clients ping this often; a session silent for 3x this is ended; 100 to 3600000 "
        "(ZCHAT_HEARTBEAT_MS; default 5000)",
    )
    parser.add_argument(
        "--durability",
        type=str.lower,
        choices=DURABILITIES,
        default=envargs.default("ZCHAT_DURABILITY", "full"),
        help="full: an ack means the message is fsynced to disk; normal: it survives a crash of the broker "
        "but maybe not of the machine, and is faster (ZCHAT_DURABILITY; default full)",
    )
    parser.add_argument(
        "--pub-hwm",
        type=int,
        default=envargs.default("ZCHAT_PUB_HWM", PUB_SNDHWM),
        help=f"room messages (events, or batches of up to {p.BATCH_MAX_BYTES // 1024} KiB of them) queued per "
        "subscriber before a slow one loses live events, which it then fetches from history; bounds the "
        "broker's memory "
        f"(ZCHAT_PUB_HWM; default {PUB_SNDHWM})",
    )
    limits = Limits()
    parser.add_argument(
        "--keys",
        type=_directory,
        default=envargs.default("ZCHAT_KEYS", None),
        help="directory with broker.key_secret and authorized/NAME.key: turns on CURVE encryption and lets in "
        "only those users, each under its own name; SIGHUP re-reads authorized/ (ZCHAT_KEYS; default: off)",
    )
    parser.add_argument(
        "--backplane",
        default=envargs.default("ZCHAT_BACKPLANE", None),
        metavar="URL",
        help="redis://HOST:PORT/DB: share one chat among several brokers through Redis (a server or a Cluster); "
        "room logs, seq, names and DMs live there and --data is not used (ZCHAT_BACKPLANE)",
    )
    parser.add_argument(
        "--retention",
        type=int,
        default=envargs.default("ZCHAT_RETENTION", None),
        metavar="N",
        help="events kept per room, the newest; older ones are deleted (ZCHAT_RETENTION; default: all of them "
        f"in the store in --data, {DEFAULT_RETENTION} with --backplane)",
    )
    parser.add_argument(
        "--retention-days",
        type=float,
        default=envargs.default("ZCHAT_RETENTION_DAYS", None),
        metavar="DAYS",
        help="delete events older than this from the store in --data, at start and then as they age "
        "(fractions allowed: 0.5 is 12 hours; ZCHAT_RETENTION_DAYS; default: keep them; not with --backplane)",
    )
    parser.add_argument(
        "--min-free",
        type=float,
        # None until main(): the default, unless given (it is refused with --backplane).
        default=envargs.default("ZCHAT_MIN_FREE", None),
        metavar="MIB",
        help="the disk alarm: while the file system of --data has less than this free (as df counts it), room "
        "messages are refused (unavailable; clients hold them and retry) and the log says so; they are taken "
        f"again at 10%% more; 0 turns it off (ZCHAT_MIN_FREE; default {MIN_FREE_BYTES >> 20}; not with --backplane)",
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=envargs.default("ZCHAT_RATE_LIMIT", limits.rate),
        help="messages + DMs a second per session, sustained; 0 turns it off "
        f"(ZCHAT_RATE_LIMIT; default {limits.rate:g})",
    )
    parser.add_argument(
        "--rate-burst",
        type=int,
        default=envargs.default("ZCHAT_RATE_BURST", limits.burst),
        help=f"messages a session may send at once above that rate (ZCHAT_RATE_BURST; default {limits.burst})",
    )
    parser.add_argument(
        "--join-rate",
        type=float,
        default=envargs.default("ZCHAT_JOIN_RATE", limits.join_rate),
        help="joins + leaves a second per session, sustained, with a burst of "
        f"{limits.join_burst}; 0 turns it off (ZCHAT_JOIN_RATE; default {limits.join_rate:g})",
    )
    parser.add_argument(
        "--history-rate",
        type=float,
        default=envargs.default("ZCHAT_HISTORY_RATE", limits.history_bytes / 1048576),
        metavar="MIB",
        help="MiB of history and rooms replies, and of member lists (who, join), a second per session, with a burst of "
        f"{limits.history_burst // 1048576} MiB; 0 turns it off (ZCHAT_HISTORY_RATE; "
        f"default {limits.history_bytes / 1048576:g})",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        # None until main(): whether the operator chose it decides how a short open-file limit is said.
        default=envargs.default("ZCHAT_MAX_SESSIONS", None),
        help="live sessions at most; each holds 2 open files, and the broker raises its open-file limit "
        f"to match, as far as it may (ZCHAT_MAX_SESSIONS; default {limits.max_sessions})",
    )
    parser.add_argument(
        "--max-sessions-per-host",
        type=int,
        metavar="N",
        default=envargs.default("ZCHAT_MAX_SESSIONS_PER_HOST", limits.max_sessions_per_host),
        help="live sessions at most whose hello came from one network address (IPv6: one /64; a session outlives its "
        "connection for 3 heartbeats: without it, one host that says hello on short connections fills the "
        f"broker); 0 turns it off (ZCHAT_MAX_SESSIONS_PER_HOST; default {limits.max_sessions_per_host})",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        metavar="RATE",
        default=envargs.default("ZCHAT_CONNECT_RATE", CONNECT_RATE),
        help=f"new client connections a second from one network address (IPv6: one /64), after a burst of "
        f"{CONNECT_BURST} or twice --max-sessions-per-host (with that off, twice --max-sessions); more wait for "
        "their turn (libzmq aborts the broker when a peer's chosen routing id meets the one it makes up for "
        f"another: pacing makes that take hours instead of minutes); 0 turns it off (ZCHAT_CONNECT_RATE; "
        f"default {CONNECT_RATE:g})",
    )
    parser.add_argument(
        "--max-rooms",
        type=int,
        default=envargs.default("ZCHAT_MAX_ROOMS", limits.max_rooms),
        help=f"rooms one session may be in (ZCHAT_MAX_ROOMS; default {limits.max_rooms})",
    )
    parser.add_argument(
        "--max-text",
        type=int,
        default=envargs.default("ZCHAT_MAX_TEXT", limits.max_text),
        help=f"longest message text in characters, at most {p.MAX_TEXT_CHARS} "
        f"(ZCHAT_MAX_TEXT; default {limits.max_text})",
    )
    parser.add_argument(
        "--max-msg-bytes",
        type=int,
        default=envargs.default("ZCHAT_MAX_MSG_BYTES", SOCKET_MAX_MSG_BYTES),
        help="a ZeroMQ frame larger than this drops the sender's connection (ZMQ_MAXMSGSIZE); smaller "
        f"oversize envelopes get a too_large error (ZCHAT_MAX_MSG_BYTES; default {SOCKET_MAX_MSG_BYTES})",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        default=envargs.default("ZCHAT_LOG_LEVEL", "info"),
        choices=LOG_LEVELS,
        help="(ZCHAT_LOG_LEVEL; default info)",
    )
    parser.add_argument("--version", action="version", version=f"zchat-broker {__version__}")
    return parser


class _StoppedWhileOpening(BaseException):
    """A SIGTERM or SIGINT while the store opens. A BaseException, as KeyboardInterrupt is,
    so that no ``except Exception`` on the way takes it for an error of the store."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _JournalFormatter(logging.Formatter):
    """Each line begins with its syslog priority as ``<N>``, which journald reads off
    (sd-daemon(3)): without it every line was stored at the unit's one level, "info", and
    ``journalctl -p warning`` (or an alert on errors) found none of the broker's warnings,
    not even the CRITICAL line of a full disk. Each line of a record of several (a
    traceback) carries the record's."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.CRITICAL:
            priority = 2
        elif record.levelno >= logging.ERROR:
            priority = 3
        elif record.levelno >= logging.WARNING:
            priority = 4
        elif record.levelno >= logging.INFO:
            priority = 6
        else:
            priority = 7
        # journald reads the prefix off each line it is given: a traceback's lines
        # without one were stored at "info", apart from the error they belong to.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def _stderr_is_the_journal() -> bool:
    """Whether systemd connected stderr to its journal (JOURNAL_STREAM names that stream:
    "device:inode"; a child that inherited the variable but not the stream is not)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def main(argv: list[str] | None = None) -> int:
    # A SIGHUP while the store opens and the keys load (a `systemctl reload` right after
    # a start) would end the process (its default action) with no word in the log: it is
    # kept, and acted on once the broker can reload.
    hups: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: hups.append(signum))
    parser = build_parser()
    args = envargs.resolve(parser, parser.parse_args(argv))
    chosen_max_sessions = args.max_sessions is not None
    if not chosen_max_sessions:
        args.max_sessions = Limits().max_sessions
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        # The journal stamps every line itself: a second time would only be noise.
        _JournalFormatter("%(levelname)s %(message)s")
        if _stderr_is_the_journal()
        else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    lifecycle.setLevel(logging.INFO)
    for flag, value, low, high in (
        # Above an hour a dead client's session (and its name) would be held for hours.
        ("--heartbeat-ms", args.heartbeat_ms, 100, MAX_HEARTBEAT_MS),
        ("--max-text", args.max_text, 1, p.MAX_TEXT_CHARS),
        ("--rate-burst", args.rate_burst, 1, None),
        ("--max-sessions", args.max_sessions, 1, None),
        ("--max-sessions-per-host", args.max_sessions_per_host, 0, None),
        ("--max-rooms", args.max_rooms, 1, None),
        # libzmq takes ZMQ_MAXMSGSIZE as a 64-bit integer and ZMQ_SNDHWM as a C int.
        ("--max-msg-bytes", args.max_msg_bytes, p.MAX_FRAME_BYTES, 2**63 - 1),
        ("--retention", 1 if args.retention is None else args.retention, 1, None),
        ("--pub-hwm", args.pub_hwm, 1, 2**31 - 1),  # 0 would be no bound at all
    ):
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            log.error("%s (or %s) must be %s, not %s", flag, _variable(flag), bounds, value)
            return 2
    host = _bind_host(args.host)
    if host is None:
        log.error(
            "%s must be one address of this machine to listen on (IPv4, IPv6, a host or interface name, "
            "or * for all), not %r: its ports are --port and --pub-port",
            envargs.given_as(args, "host", "--host"),
            args.host,
        )
        return 2
    args.host = host
    # zchat reads ZCHAT_HOST too, as the broker to connect to: one exported in an
    # operator's shell for the client (127.0.0.1, the server's public name) makes the
    # broker listen there. Kept (a broker's unit may set it); said where it matters.
    host_from_env = envargs.given_as(args, "host", "--host") == "ZCHAT_HOST"
    if args.port == args.pub_port != 0:
        log.error(
            "--port and --pub-port (or ZCHAT_PORT and ZCHAT_PUB_PORT) are both %d: requests and room events "
            "need a port each",
            args.port,
        )
        return 2
    if args.backplane and (problem := backplane_url_problem(args.backplane)):
        log.error("--backplane (or ZCHAT_BACKPLANE) %r: %s", shown_url(args.backplane), problem)
        return 2
    if args.retention_days is not None:
        if not (math.isfinite(args.retention_days) and 1 <= args.retention_days * DAY_MS <= MAX_AGE_MS):
            log.error(
                # (Kept in whole ms: a positive number of days below one ms would round to none.)
                "--retention-days (or ZCHAT_RETENTION_DAYS) must be a number of days of at least 1 ms "
                "(0.0000000116) and at most %d, not %s",
                MAX_AGE_MS // DAY_MS,
                args.retention_days,
            )
            return 2
        if args.backplane:
            log.error(
                "--retention-days (or ZCHAT_RETENTION_DAYS) applies to the store in --data; "
                "with --backplane, --retention sets how many events of each room Redis keeps"
            )
            return 2
    if args.min_free is not None:
        if not (math.isfinite(args.min_free) and args.min_free >= 0):
            log.error("--min-free (or ZCHAT_MIN_FREE) must be 0 (off) or a number of MiB, not %s", args.min_free)
            return 2
        if args.backplane:
            log.error(
                "--min-free (or ZCHAT_MIN_FREE) guards the store in --data; with --backplane the room logs are "
                "in Redis (see its maxmemory)"
            )
            return 2
    for flag, rate in (
        ("--rate-limit", args.rate_limit),
        ("--join-rate", args.join_rate),
        ("--history-rate", args.history_rate),
        ("--connect-rate", args.connect_rate),
    ):
        if not (math.isfinite(rate) and rate >= 0):
            log.error("%s (or %s) must be 0 (off) or more, not %s", flag, _variable(flag), rate)
            return 2
    limit, wanted = fit_open_files_limit(args.max_sessions)
    if limit is not None and limit < MIN_OPEN_FILES:
        log.error(
            "the open-file limit is %d, below the %d the broker needs to start; "
            "raise it (ulimit -n, or LimitNOFILE= in a systemd unit)",
            limit,
            MIN_OPEN_FILES,
        )
        return 1
    if limit is not None and limit < wanted:
        room = max(0, (limit - FD_MARGIN) // 2)
        if chosen_max_sessions or room < FEW_SESSIONS:
            log.warning(
                "the open-file limit is %d: enough for about %d sessions (2 connections each), fewer than "
                "%s: clients beyond that wait unanswered; raise it (ulimit -n, or LimitNOFILE= "
                "in a systemd unit)",
                limit,
                room,
                f"--max-sessions {args.max_sessions}"
                if envargs.given_as(args, "max_sessions", "--max-sessions") == "--max-sessions"
                else f"ZCHAT_MAX_SESSIONS={args.max_sessions}",
            )
        else:
            # Not a warning at every start of a broker that never asked for the default
            # 10,000 sessions (a hard limit of 20,000, or a shell's 4,096): what it holds,
            # and how to hold more, once, with the other start lines.
            log.info(
                "the open-file limit is %d: enough for about %d sessions (2 connections each; the default "
                "--max-sessions is %d); to serve more, raise it (ulimit -n, or LimitNOFILE= in a systemd unit)",
                limit,
                room,
                args.max_sessions,
            )
    data_dir: Path = args.data or default_data_dir()
    config = Config(
        host=args.host,
        port=args.port,
        pub_port=args.pub_port,
        data_dir=data_dir,
        heartbeat_ms=args.heartbeat_ms,
        durability=args.durability,
        pub_hwm=args.pub_hwm,
        limits=Limits(
            rate=args.rate_limit,
            burst=args.rate_burst,
            join_rate=args.join_rate,
            history_bytes=args.history_rate * 1048576,
            max_sessions=args.max_sessions,
            max_sessions_per_host=args.max_sessions_per_host,
            max_rooms=args.max_rooms,
            max_text=args.max_text,
        ),
        max_msg_bytes=args.max_msg_bytes,
        keys_dir=args.keys,
        backplane=args.backplane,
        retention=args.retention,
        connect_rate=args.connect_rate,
        min_free_bytes=MIN_FREE_BYTES if args.min_free is None else round(args.min_free * 1048576),
        # (A host may hold that many sessions, and may reconnect them all at once, twice.)
        connect_burst=max(CONNECT_BURST, 2 * (args.max_sessions_per_host or args.max_sessions)),
    )
    if config.backplane and not HAVE_REDIS:
        log.error("%s", NO_REDIS)
        return 2
    # Opening the store may take many seconds (a new --retention deleting a year of events,
    # a schema upgrade): a stop then ends the open, whose transaction is rolled back. Before,
    # a `systemctl stop` then killed the broker without a line in the log, and a Ctrl-C
    # printed a KeyboardInterrupt traceback. Binding and starting the threads take moments:
    # a stop asked meanwhile is done once the broker can stop cleanly (below).
    opening = [not config.backplane]
    early_stops: list[int] = []

    def on_early_signal(signum: int, frame: FrameType | None) -> None:
        if opening[0]:
            raise _StoppedWhileOpening(signum)
        early_stops.append(signum)

    store: Store | None = None
    if config.backplane:
        signal.signal(signal.SIGINT, on_early_signal)
        signal.signal(signal.SIGTERM, on_early_signal)
    else:
        try:
            # (In the try: a signal right after these is a stop while opening too.)
            signal.signal(signal.SIGINT, on_early_signal)
            signal.signal(signal.SIGTERM, on_early_signal)
            max_age = None if args.retention_days is None else round(args.retention_days * DAY_MS)
            store = Store(data_dir, config.durability, config.retention, max_age)
            opening[0] = False
        except StoreError as exc:
            log.error("%s", exc)
            return 1
        except _StoppedWhileOpening as exc:
            _close(store)
            lifecycle.info(
                "%s received while opening the store; stopped before serving (what the open had begun is rolled back)",
                signal.Signals(exc.signum).name,
            )
            return 0
    try:
        broker = Broker(config, store)
    except GateError as exc:
        log.error("%s", exc)
        _discard(store)
        return 1
    except zmq.ZMQError as exc:
        why = exc.strerror
        if exc.errno == errno.ENODEV:  # libzmq's word for a name that is no address or interface here
            why += " (no address or network interface of this machine has that name)"
        privileged = [
            f"{flag} {port}" for flag, port in (("--port", args.port), ("--pub-port", args.pub_port)) if 0 < port < 1024
        ]
        if exc.errno == errno.EACCES and privileged:
            # "Permission denied" alone sent operators looking at files and directories.
            why += (
                f"; {' and '.join(privileged)}: a port below 1024 needs root or CAP_NET_BIND_SERVICE: use ports "
                "of 1024 or more, or give the broker that capability (under systemd: "
                "AmbientCapabilities=CAP_NET_BIND_SERVICE, docs/operations.md)"
            )
        if exc.errno == errno.EADDRINUSE:
            # A newcomer's second broker (another terminal, a service) is the usual cause.
            why += "; another program has that port (a zchat-broker already running?): stop it, or pick free ports"
            why += " with --port and --pub-port"
        if host_from_env and exc.errno in (errno.ENODEV, errno.EADDRNOTAVAIL):
            why += "; that address came from ZCHAT_HOST, which zchat also reads as the broker to connect to"
        log.error("cannot listen on %s ports %d/%d: %s", args.host, args.port, args.pub_port, why)
        _discard(store)
        return 1
    except (KeysError, StoreError) as exc:
        log.error("%s", exc)
        _discard(store)
        return 1
    except BackplaneErrors as exc:
        log.error("cannot reach the backplane %s: %s", shown_url(config.backplane or ""), exc)
        return 1

    # What exists now (modules, the resend window read from the store) lives as
    # long as the process: frozen, a full collection no longer walks it, so it
    # no longer holds the loop up for ~5-10 ms now and then.
    gc.collect()
    gc.freeze()

    stopping_at: list[float] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        lifecycle.info("%s received, shutting down", signal.Signals(signum).name)
        broker.stop()
        if not stopping_at:
            stopping_at.append(time.monotonic())
            # A stop normally takes milliseconds; one that does not (a disk that stalls,
            # a bug) shows every thread's stack in the log, before a supervisor's
            # SIGKILL (docker stop's comes after 10 s) leaves nothing to go on. Without
            # a stderr to write to (2>&-), there is no log to show them in either.
            with contextlib.suppress(RuntimeError, ValueError, OSError, AttributeError):
                faulthandler.dump_traceback_later(STOP_STACKS_S, exit=False)

    def on_hup(signum: int, frame: FrameType | None) -> None:
        broker.reload()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    if early_stops:
        on_signal(early_stops[0], None)
    if hups:  # keys read before it came may have changed since
        broker.reload()
    if broker.keys is None:
        log.warning(
            "no --keys: traffic is unauthenticated and unencrypted; expose these ports only to a trusted network"
        )
    else:
        lifecycle.info(
            "CURVE on: %d authorized user%s; broker public key %s",
            len(broker.keys.users),
            "" if len(broker.keys.users) == 1 else "s",
            broker.keys.public.decode(),
        )
        if not broker.keys.users:
            log.warning(
                "no authorized users: nobody can connect until users' NAME.key files are in %s "
                "and the broker gets a SIGHUP",
                broker.config.keys_dir / "authorized" if broker.config.keys_dir else "authorized/",
            )
    kept = DEFAULT_RETENTION if config.retention is None else config.retention
    where = (
        f"backplane {shown_url(config.backplane or '')} "
        f"(broker {broker.core_id}; keeping the newest {kept} events of each room)"
    )
    # A stop that came while the ports were bound ("shutting down" is logged already):
    # the broker stops without serving, and is never ready.
    if not stopping_at:
        lifecycle.info(
            "zchat-broker %s ready: requests on %s, room events on %s, store %s, epoch %s; heartbeat %d ms%s%s",
            __version__,
            broker.endpoint,
            broker.pub_endpoint,
            store.describe() if store is not None else where,
            broker.core.epoch,
            config.heartbeat_ms,
            f", durability {config.durability}, {_alarm_text(config.min_free_bytes)}" if store is not None else "",
            f"; address from ZCHAT_HOST={args.host}" if host_from_env else "",
        )
    try:
        broker.run()
    except StoreError as exc:
        log.critical("%s; stopping so that nothing unstored is acknowledged", exc)
        return 1
    except ListenLost as exc:
        log.critical("%s; stopping", exc)
        return 1
    finally:
        _close(store)
        faulthandler.cancel_dump_traceback_later()
    if stopping_at:
        lifecycle.info("stopped in %.2f s", time.monotonic() - stopping_at[0])
    else:
        lifecycle.info("stopped")
    return 0


def _close(store: Store | None) -> None:
    if store is not None:
        store.close()


def _discard(store: Store | None) -> None:
    """A broker that never served leaves no empty store behind (Store.discard)."""
    if store is not None:
        store.discard()


if __name__ == "__main__":
    sys.exit(main())
