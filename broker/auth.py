"""CURVE keys and who may connect: ZeroMQ's own security (CurveZMQ + ZAP).

Layout of a key directory (``zchat-broker --keys DIR``)::

    DIR/broker.key_secret      the broker's keypair (give DIR/broker.key to users)
    DIR/authorized/alice.key   one public certificate per user, named after the user

The ZAP handler that checks the keys is broker/gate.py's, on its own thread; it
only reads the table of authorized keys, which the broker loop replaces wholesale
on reload, so no socket or mutable state is shared between threads.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from broker.store import runs_as
from zchat import protocol as p

log = logging.getLogger("zchat.broker")

BROKER_CERT = "broker"


class KeysError(Exception):
    """A key file is missing or unreadable; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True)
class Keys:
    """The broker's keypair and the authorized users (z85 public key -> name)."""

    public: bytes
    secret: bytes
    users: dict[bytes, str]


def _unreadable(what: str, path: Path, exc: OSError | ValueError) -> KeysError:
    hint = ""
    if isinstance(exc, PermissionError):
        # Keys made by root for a broker that runs as a service user: the usual cause.
        hint = f"; the broker runs as {runs_as()} and must be able to read it"
    return KeysError(f"cannot read the {what} {path}: {exc}{hint}")


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` certificate."""
    try:
        path.stat()  # (pyzmq says a missing file is an "Invalid certificate file")
    except (FileNotFoundError, NotADirectoryError):
        name = path.name.removesuffix(".key_secret")
        raise KeysError(
            f"cannot read the secret key {path}: there is no such file (`zchat-keygen {name} --dir {path.parent}` "
            "makes it)"
        ) from None
    except OSError as exc:
        raise _unreadable("secret key", path, exc) from None
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise _unreadable("secret key", path, exc) from None
    if not secret:
        raise KeysError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public(path: Path) -> bytes:
    return _load_certificate(path)[0]


def _load_certificate(path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a certificate read as a public key."""
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise _unreadable("public key", path, exc) from None


def load_users(directory: Path) -> dict[bytes, str]:
    """Every ``NAME.key`` in ``directory``: public key -> NAME. Bad files are skipped, loudly.

    A directory that cannot be listed is a KeysError, never an empty one: on a
    reload that would revoke everyone. A NAME.key that cannot be read or parsed
    lets nobody in as NAME (on a reload, NAME's sessions end): it may be the new
    key of a user whose old one leaked, and the broker cannot tell.
    """
    try:
        entries = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        raise KeysError(f"no authorized-users directory {directory} (put users' NAME.key files there)") from None
    except OSError as exc:
        raise _unreadable("authorized-users directory", directory, exc) from None
    files = sorted(entry for entry in entries if entry.endswith(".key"))
    # The easy slip is copying the user's other file: it let nobody in without a word in
    # the log (the start line's count of users one short), and the user's secret then
    # lies on the broker host.
    for entry in sorted(entry for entry in entries if entry.endswith(".key_secret")):
        log.warning(
            "skipping %s: a secret key; authorized/ takes the user's public %s.key (the secret stays "
            "with the user: delete this copy)",
            directory / entry,
            entry.removesuffix(".key_secret"),
        )
    users: dict[bytes, str] = {}
    #: Keys found under two names, and those names: the key says who is speaking, so
    #: it cannot be both. Either could be the mistake: neither is accepted.
    shared: dict[bytes, list[str]] = {}
    for path in (directory / entry for entry in files):
        name = path.stem
        if not p.is_name(name):
            log.warning("skipping %s: %r is not a valid user name", path, name)
            continue
        try:
            key, secret = _load_certificate(path)
        except KeysError as exc:
            log.warning("%s: nobody is let in as %s until it can be", exc, name)
            continue
        if secret:
            log.warning(
                "%s holds %s's secret key too (a NAME.key_secret renamed): the broker needs only the public "
                "NAME.key; the secret stays with the user: put the public file in its place",
                path,
                name,
            )
        if key in users or key in shared:
            shared.setdefault(key, [users.pop(key)] if key in users else []).append(name)
            continue
        users[key] = name
    for names in shared.values():
        log.error(
            "one key is authorized as %s in %s: a key names one user, so none of them is accepted "
            "until only one of those files is left",
            " and ".join(repr(n) for n in names),
            directory,
        )
    spellings: dict[str, list[str]] = {}
    for name in users.values():
        spellings.setdefault(p.name_key(name), []).append(name)
    for names in spellings.values():
        if len(names) > 1:
            log.warning(
                "%s in %s differ only in case, which makes them one name in the chat: only one of them "
                "can be online at a time; rename one of the files",
                " and ".join(repr(n) for n in sorted(names)),
                directory,
            )
    return users


def load_keys(directory: Path) -> Keys:
    path = directory / f"{BROKER_CERT}.key_secret"
    public, secret = load_secret(path)
    if path.stat().st_mode & 0o004:
        log.warning(
            "%s is readable by every user of this machine, and whoever reads it can impersonate the "
            "broker: chmod 600 it (or 640, its group the broker's user's)",
            path,
        )
    return Keys(public, secret, load_users(directory / "authorized"))


def secure_server(sock: zmq.Socket[bytes], keys: Keys, domain: bytes) -> None:
    """CURVE on a bound socket; the ZAP handler of ``domain`` (broker/gate.py) checks the keys."""
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.zap_domain = domain
    # Without a ZAP handler there (the gate's thread gone), libzmq would let every key in.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def keygen_main(argv: list[str] | None = None) -> int:
    """``zchat-keygen``: make a CURVE keypair in ZeroMQ's certificate format."""
    parser = argparse.ArgumentParser(
        prog="zchat-keygen",
        description="Create a CURVE keypair: NAME.key (public, to share) and NAME.key_secret (keep private).",
        epilog="For the broker use the name 'broker' and keep both files in its --keys directory; for a user, "
        "copy NAME.key into the broker's KEYS/authorized/ and give the user NAME.key_secret and broker.key.",
    )
    parser.add_argument("name", help="the user's chat name, or 'broker'")
    parser.add_argument("--dir", type=Path, default=Path("."), help="where to write the files (default .)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    if args.name != BROKER_CERT and not p.is_name(args.name):
        print(f"zchat-keygen: {args.name!r} is not a valid chat name", file=sys.stderr)
        return 2
    public = args.dir / f"{args.name}.key"
    secret = args.dir / f"{args.name}.key_secret"
    if not args.force and (public.exists() or secret.exists()):
        print(f"zchat-keygen: {public} or {secret} exists; --force overwrites", file=sys.stderr)
        return 1
    args.dir.mkdir(parents=True, exist_ok=True)
    # pyzmq writes both files under the process's umask: the secret must never be
    # readable by others, not even until a chmod after the write.
    umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(args.dir, args.name)
    finally:
        os.umask(umask)
    secret.chmod(0o600)
    public.chmod(0o644 & ~umask)  # the public key is for sharing
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0
