"""CURVE on: only authorized keys get in, each under its own name; revocation ends a session."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from client.lib import Client, CurveKeys, Event, RequestError
from tests.conftest import HOST, BrokerProcess, RunningBroker, as_user, bin_path, recv_all, wait_for, world_traversable
from zchat import protocol as p


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A broker key directory with alice and bob authorized; mallory has a key of her own."""
    root = tmp_path / "keys"
    (root / "authorized").mkdir(parents=True)
    users = tmp_path / "users"
    users.mkdir()
    result = subprocess.run(
        [bin_path("zchat-keygen"), "broker", "--dir", str(root)],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (root / "broker.key_secret").stat().st_mode & 0o077 == 0, "secret key readable by others"
    for name in ("alice", "bob", "mallory"):
        zmq.auth.create_certificates(users, name)
    for name in ("alice", "bob"):
        (root / "authorized" / f"{name}.key").write_bytes((users / f"{name}.key").read_bytes())
    return tmp_path


def curve(keys: Path, user: str, broker_key: str = "keys/broker.key") -> CurveKeys:
    return CurveKeys.load(keys / "users" / f"{user}.key_secret", keys / broker_key)


@pytest.fixture
def secure(keys: Path) -> Iterator[RunningBroker]:
    running = RunningBroker(keys / "data", keys_dir=keys / "keys").start()
    yield running
    running.stop()


def client(b: RunningBroker, name: str, keys: CurveKeys | None, **kw: object) -> Client:
    return Client(name, HOST, b.port, b.pub_port, curve=keys, connect_timeout=3, **kw)  # type: ignore[arg-type]


def test_authorized_users_chat(secure: RunningBroker, keys: Path) -> None:
    with client(secure, "alice", curve(keys, "alice")) as alice, client(secure, "bob", curve(keys, "bob")) as bob:
        alice.join("general")
        bob.join("general")
        alice.send("general", "encrypted hello")

        def got() -> bool:
            bob.pump(0.05)
            return any(e.text == "encrypted hello" for e in bob.drain_events())

        wait_for(got, 5, interval=0)


@pytest.mark.parametrize(
    ("who", "broker_key", "needle"),
    [
        ("mallory", "keys/broker.key", "does not accept our key"),
        ("alice", "users/bob.key", "handshake"),
        (None, None, "requires CURVE keys"),
    ],
    ids=["unknown key", "wrong broker key", "no key"],
)
def test_refused_clients_get_a_clear_error(
    secure: RunningBroker, keys: Path, who: str | None, broker_key: str | None, needle: str
) -> None:
    c = client(secure, who or "nobody", curve(keys, who, broker_key) if who and broker_key else None)
    try:
        with pytest.raises(RequestError) as err:
            c.connect()
        assert err.value.code == "auth_failed"
        assert needle in err.value.message
        assert f":{secure.port}" in err.value.message and f":{secure.pub_port}" not in err.value.message
    finally:
        c.close(0)


def test_outsiders_cannot_read_rooms(secure: RunningBroker, keys: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    spies = []
    for user in (None, "mallory"):
        spy = ctx.socket(zmq.SUB)
        spy.setsockopt(zmq.LINGER, 0)
        if user:
            k = curve(keys, user)
            spy.curve_publickey, spy.curve_secretkey, spy.curve_serverkey = k.public, k.secret, k.server_public
        spy.setsockopt(zmq.SUBSCRIBE, b"")
        spy.connect(f"tcp://{HOST}:{secure.pub_port}")
        spies.append(spy)
    with client(secure, "alice", curve(keys, "alice")) as alice:
        alice.join("general")
        for i in range(5):
            alice.send_wait("general", f"secret {i}")
    for spy in spies:
        assert recv_all(spy, quiet=0.5) == []


def test_key_decides_the_name(secure: RunningBroker, keys: Path) -> None:
    c = client(secure, "bob", curve(keys, "alice"))  # alice's key, bob's name
    try:
        with pytest.raises(RequestError) as err:
            c.connect()
        assert err.value.code == "bad_name"
        assert err.value.message == "your key belongs to 'alice'; you cannot be 'bob'"
    finally:
        c.close(0)


def test_a_key_file_that_is_not_there_is_named(keys: Path) -> None:
    with pytest.raises(RequestError) as err:
        CurveKeys.load(keys / "users" / "nobody.key_secret", keys / "keys" / "broker.key")
    assert err.value.code == "bad_key" and "no secret key file" in err.value.message and "nobody" in err.value.message
    with pytest.raises(RequestError) as err:
        CurveKeys.load(keys / "users" / "alice.key_secret", keys / "keys" / "missing.key")
    assert "no broker key file" in err.value.message and "missing.key" in err.value.message


def test_the_brokers_secret_key_is_refused_where_its_public_one_goes(keys: Path) -> None:
    """``--broker-key broker.key_secret`` worked (the public key is in it too), and so the
    broker's secret, with which anyone can pose as the broker, went round the clients."""
    with pytest.raises(RequestError) as err:
        CurveKeys.load(keys / "users" / "alice.key_secret", keys / "keys" / "broker.key_secret")
    assert err.value.code == "bad_key"
    assert "holds the broker's secret key: give clients its public one (broker.key" in err.value.message
    assert curve(keys, "alice").server_public  # the public one as ever


def wait_until_cut_off(witness: Client, revoked: Client) -> None:
    """Until ``witness`` (in #general) sees ``revoked`` leave, and ``revoked`` is refused its key."""
    seen: list[Event] = []

    def left() -> bool:
        witness.pump(0.05)
        revoked.pump(0.01)
        seen.extend(witness.drain_events())
        return any(e.type == "presence" and e.name == revoked.name and e.event == "leave" for e in seen)

    wait_for(left, 10, interval=0, what=lambda: (seen, witness.state))

    def refused() -> bool:
        revoked.pump(0.05)
        witness.pump(0.01)
        return any(e.type == "error" and e.code == "auth_failed" for e in revoked.drain_events())

    wait_for(refused, 15, interval=0)


def test_revoked_key_is_refused_and_session_ended(secure: RunningBroker, keys: Path) -> None:
    alice = client(secure, "alice", curve(keys, "alice"))
    bob = client(secure, "bob", curve(keys, "bob"))
    try:
        alice.connect()
        bob.connect()
        alice.join("general")
        bob.join("general")
        (keys / "keys" / "authorized" / "bob.key").unlink()
        secure.broker.reload()
        wait_until_cut_off(alice, bob)
        assert bob.state != "connected"
        # Refused, bob's client goes on trying (a key may be authorized again), but a
        # pump never blocks: it hung in a send to a DEALER with no peer to take it.
        until = time.monotonic() + 12
        while time.monotonic() < until:
            started = time.monotonic()
            bob.pump(0.2)
            assert time.monotonic() - started < 2, "pump blocked"
        # alice was reconnected by the rebind and goes on chatting.
        wait_for(lambda: alice.pump(0.05) is not None and alice.state == "connected", 15)
        assert alice.send_wait("general", "still here").seq is not None
        assert alice.who("general") == ["alice"]
        fresh = client(secure, "bob", curve(keys, "bob"))
        with pytest.raises(RequestError):
            fresh.connect()
        fresh.close(0)
    finally:
        alice.close(0)
        bob.close(0)


def test_cli_with_keys(keys: Path) -> None:
    broker = BrokerProcess(keys / "data", extra=["--keys", str(keys / "keys")]).start()
    try:
        assert any("CURVE on: 2 authorized users" in line for line in broker.log)
        ok = subprocess.run(
            [bin_path("zchat"), "--name", "alice", "--send", "hi", "--key", str(keys / "users/alice.key_secret")],
            env={**broker.env(), "ZCHAT_BROKER_KEY": str(keys / "keys/broker.key")},
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert ok.returncode == 0, ok.stderr
        assert "<alice> hi" in ok.stdout
        bad = subprocess.run(
            [bin_path("zchat"), "--name", "mallory", "--send", "hi"],
            env={**broker.env(), "ZCHAT_BROKER_KEY": str(keys / "keys/broker.key")},
            input="",
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert bad.returncode == 2 and "go together" in bad.stderr
        missing = subprocess.run(
            [bin_path("zchat"), "--name", "x", "--key", "/nonexistent", "--broker-key", str(keys / "keys/broker.key")],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert missing.returncode == 2 and "/nonexistent" in missing.stderr
        keyless = subprocess.run(
            [bin_path("zchat"), "--name", "x", "--send", "hi"],
            env=broker.env(),
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        endpoint = f"tcp://{HOST}:{broker.port}"
        assert keyless.returncode == 1
        assert keyless.stderr == f"zchat: the broker at {endpoint} requires CURVE keys (--key and --broker-key)\n"
    finally:
        broker.kill()


def test_broker_without_keys_warns(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "d").start()
    try:
        assert any("unauthenticated and unencrypted" in line for line in broker.log)
    finally:
        broker.kill()


def test_keygen_refuses_bad_names_and_overwrites(tmp_path: Path) -> None:
    bad = subprocess.run(
        [bin_path("zchat-keygen"), "-x", "--dir", str(tmp_path)], capture_output=True, timeout=15, check=False
    )
    assert bad.returncode != 0
    ok = subprocess.run(
        [bin_path("zchat-keygen"), "carol", "--dir", str(tmp_path)], capture_output=True, timeout=15, check=False
    )
    assert ok.returncode == 0
    public, secret = zmq.auth.load_certificate(tmp_path / "carol.key_secret")
    assert secret and p.is_name("carol") and public == zmq.auth.load_certificate(tmp_path / "carol.key")[0]
    again = subprocess.run(
        [bin_path("zchat-keygen"), "carol", "--dir", str(tmp_path)], capture_output=True, timeout=15, check=False
    )
    assert again.returncode == 1


def test_keys_against_a_broker_without_them_say_so(broker: RunningBroker, keys: Path) -> None:
    """The broker's greeting names its security: the two ends differ, not a wrong key."""
    c = client(broker, "alice", curve(keys, "alice"))
    try:
        with pytest.raises(RequestError) as err:
            c.connect()
        assert err.value.code == "auth_failed"
        assert (
            err.value.message
            == f"the broker at tcp://{HOST}:{broker.port} does not use CURVE keys: connect without them"
        )
    finally:
        c.close(0)


def test_refused_keys_are_logged_at_most_20_a_second(caplog: pytest.LogCaptureFixture) -> None:
    """Anyone can make a key and knock: a loop of refused handshakes must not fill the disk."""
    from broker.gate import Gate

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        gate = Gate(ctx, {}, rate=0, burst=1)
        for i in range(50):  # new keys each time: one repeated is one line (the next test)
            gate._log_refusal(b"%040d" % i, "10.0.0.1")
        refused = [r for r in caplog.records if "not authorized" in r.getMessage()]
        assert 20 <= len(refused) <= 40  # 20 a second: the loop may straddle one boundary
    finally:
        ctx.term()


def test_a_key_authorized_again_lets_the_refused_client_back_in(secure: RunningBroker, keys: Path) -> None:
    """Refused on a reconnect, the client tries again on fresh sockets (libzmq never
    reconnects one whose handshake was refused), says so once, and loses nothing."""
    key = keys / "keys" / "authorized" / "bob.key"
    with client(secure, "bob", curve(keys, "bob")) as bob:
        bob.join("general")
        saved = key.read_bytes()
        key.unlink()
        secure.broker.reload()
        events: list[Event] = []

        def refused() -> bool:
            bob.pump(0.05)
            events.extend(bob.drain_events())
            return any(e.code == "auth_failed" for e in events)

        wait_for(refused, 15, interval=0)
        bob.send("general", "written while refused")
        until = time.monotonic() + 7  # two tries at least (one every 3 s here)
        while time.monotonic() < until:
            bob.pump(0.1)
            events.extend(bob.drain_events())
        assert bob.state == "reconnecting"
        assert len([e for e in events if e.code == "auth_failed"]) == 1, events
        key.write_bytes(saved)
        secure.broker.reload()
        wait_for(lambda: bob.pump(0.05) is not None and bob.state == "connected" and bob.unacked == 0, 15)
        texts = [e.text for e in bob.history("general")[0] if e.type == "msg"]
        assert texts == ["written while refused"]


def test_one_key_under_two_names_is_accepted_under_neither(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The key says who is speaking: copied as zed.key beside alice.key, it made alice's
    key speak as zed (the last file in sorted order won), without a word."""
    from broker.auth import load_users

    authorized = keys / "keys" / "authorized"
    (authorized / "zed.key").write_bytes((authorized / "alice.key").read_bytes())
    users = load_users(authorized)
    assert sorted(users.values()) == ["bob"]
    assert any(r.levelname == "ERROR" and "'alice' and 'zed'" in r.getMessage() for r in caplog.records), caplog.records


def test_two_users_whose_names_differ_only_in_case_are_warned_of(
    keys: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bob.key beside bob.key: two people the chat takes for one name (only one can be online)."""
    import zmq.auth

    from broker.auth import load_users

    authorized = keys / "keys" / "authorized"
    public, _secret = zmq.auth.create_certificates(tmp_path, "Bob")
    (authorized / "Bob.key").write_bytes(Path(public).read_bytes())
    users = load_users(authorized)
    assert sorted(users.values()) == ["Bob", "alice", "bob"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'Bob' and 'bob'" in m and "differ only in case" in m for m in warned), warned


def test_a_users_secret_key_in_authorized_is_warned_of(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The user's other file copied into authorized/: carol.key_secret let nobody in without a
    word (the start line's count one short), and dave's secret renamed dave.key was taken as
    it is (its public half is right) with the user's secret on the broker host, unsaid."""
    from broker.auth import load_users

    users, authorized = keys / "users", keys / "keys" / "authorized"
    for name in ("carol", "dave"):
        zmq.auth.create_certificates(users, name)
    (authorized / "carol.key_secret").write_bytes((users / "carol.key_secret").read_bytes())
    (authorized / "dave.key").write_bytes((users / "dave.key_secret").read_bytes())
    assert sorted(load_users(authorized).values()) == ["alice", "bob", "dave"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("carol.key_secret: a secret key" in m and "public carol.key" in m for m in warned), warned
    assert any("dave.key holds dave's secret key too" in m for m in warned), warned
    assert not any("alice" in m or "bob" in m for m in warned), warned


def test_a_port_taken_while_rebinding_stops_the_broker_with_a_reason() -> None:
    """Revoking a key lets go of both ports for a moment (to cut every connection); a
    process of this host may take one then. The broker says so and stops (exit 1 in the
    CLI), rather than dying on an unhandled error."""
    from broker.server import ListenLost, _rebind

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock, thief = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    try:
        for s in (sock, thief):
            s.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port(f"tcp://{HOST}")
        endpoint = f"tcp://{HOST}:{port}"
        unbind = sock.unbind

        def unbind_and_lose_the_port(address: str) -> None:
            unbind(address)
            wait_for(lambda: _took(thief, address), 5, interval=0.01)

        sock.unbind = unbind_and_lose_the_port  # type: ignore[method-assign]
        with pytest.raises(ListenLost, match=f"cannot listen on {endpoint} again"):
            _rebind(sock, endpoint, timeout=0.2)
    finally:
        sock.close(0)
        thief.close(0)
        ctx.term()


#: The broker with its rebind made to lose the port (the real race cannot be staged on
#: demand); the revocation, the signal and the CLI's handling of the loss are real.
_LOSES_ITS_PORT = """
import sys
import broker.server as server

def lose(sock, endpoint, timeout=5.0):
    raise server.ListenLost(f"cannot listen on {endpoint} again after cutting every connection (a key was revoked)")

server._rebind = lose
from broker.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.timeout(30)
def test_the_cli_stops_with_one_critical_line_when_a_revocation_loses_a_port(keys: Path) -> None:
    broker = BrokerProcess(
        keys / "data", extra=["--keys", str(keys / "keys")], prefix=[sys.executable, "-c", _LOSES_ITS_PORT]
    ).start()
    try:
        (keys / "keys" / "authorized" / "bob.key").unlink()
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)  # reload: bob revoked, every connection cut
        assert broker.proc.wait(timeout=10) == 1
        wait_for(lambda: any("CRITICAL" in line for line in broker.log), 5)
        log = "".join(broker.log)
        assert re.search(r"CRITICAL cannot listen on tcp://\S+ again after cutting every connection .*; stopping", log)
        assert "Traceback" not in log
    finally:
        broker.kill()


def _took(sock: zmq.Socket[bytes], endpoint: str) -> bool:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError:
        return False
    return True


def test_an_authorized_directory_the_broker_cannot_read_is_an_error_not_no_users(keys: Path) -> None:
    """Python's glob skips a directory it may not list: a reload then found 0 users and
    revoked everyone ('reloaded 0 authorized keys; revoked: alice, bob'), a start let
    nobody in with no error. Keys made by root for a service user do that."""
    from broker.auth import load_users

    with world_traversable() as top:
        authorized = top / "authorized"
        shutil.copytree(keys / "keys" / "authorized", authorized)
        authorized.chmod(0o700)  # root's
        out = as_user(lambda: repr(sorted(load_users(authorized).values())))
        assert out.startswith("KeysError: cannot read the authorized-users directory"), out
        assert "Permission denied" in out and "runs as nobody (uid 65534)" in out, out
        authorized.chmod(0o755)
        assert as_user(lambda: repr(sorted(load_users(authorized).values()))) == "['alice', 'bob']"


def test_a_key_file_that_cannot_be_read_lets_nobody_in_under_its_name(
    secure: RunningBroker, keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It may be the new key of a user whose old one leaked (made by root, 0600, for a broker
    that runs as a service user): the old key must not go on working. The warning says who
    is out and why."""
    alice = client(secure, "alice", curve(keys, "alice"))
    try:
        alice.connect()
        alice.join("general")
        key = keys / "keys" / "authorized" / "alice.key"
        key.write_bytes(key.read_bytes()[:40])
        secure.broker.reload()
        wait_for(lambda: any("revoked: alice;" in r.getMessage() for r in caplog.records), 5)
        assert any(
            re.search(r"cannot read the public key .*alice\.key: .*: nobody is let in as alice until it can be", line)
            for line in (r.getMessage() for r in caplog.records)
        )
    finally:
        alice.close(0)
    from broker.auth import load_users

    with world_traversable() as top:  # as the service user: a key file it may not read
        shutil.copytree(keys / "keys" / "authorized", top / "authorized")
        (top / "authorized").chmod(0o755)
        (top / "authorized" / "bob.key").chmod(0o600)  # root's
        assert as_user(lambda: repr(sorted(load_users(top / "authorized").values()))) == "[]"  # alice cut short


def test_a_user_given_a_new_key_loses_the_sessions_of_the_old_one(
    secure: RunningBroker, keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """bob's secret leaked, the operator put a new bob.key in place and sent SIGHUP: the
    session made with the old key stayed (only removed names were revoked)."""
    alice = client(secure, "alice", curve(keys, "alice"))
    leaked = client(secure, "bob", curve(keys, "bob"))
    try:
        alice.connect()
        leaked.connect()
        alice.join("general")
        leaked.join("general")
        zmq.auth.create_certificates(keys / "users", "bob2")
        (keys / "keys" / "authorized" / "bob.key").write_bytes((keys / "users" / "bob2.key").read_bytes())
        secure.broker.reload()
        wait_until_cut_off(alice, leaked)
        lines = [r.getMessage() for r in caplog.records]
        assert any("revoked: none; new key: bob" in line for line in lines), lines
        assert any(re.search(r"refused the CURVE key of bob from 127\.0\.0\.1: it was revoked", line) for line in lines)
        fresh = client(secure, "bob", CurveKeys.load(keys / "users" / "bob2.key_secret", keys / "keys/broker.key"))
        try:
            fresh.connect()
            fresh.join("general")
            assert fresh.who("general") == ["alice", "bob"]
        finally:
            fresh.close(0)
    finally:
        alice.close(0)
        leaked.close(0)


def test_a_client_refused_on_both_ports_is_one_log_line_naming_its_address(
    ctx: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker import gate as gate_module
    from broker.gate import REFUSAL_REPEAT_S, Gate

    # The knocks' times are the test's own: with real sleeps, one that overslept by
    # 0.4 s on a loaded machine moved a knock across a window's edge.
    now = [1000.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], time=lambda: now[0])
    monkeypatch.setattr(gate_module, "time", clock)
    gate = Gate(ctx, {b"k" * 40: "alice"}, rate=0, burst=1)  # (its thread not started)
    for address in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):  # a try (two ports), then another host
        gate._log_refusal(b"m" * 40, address)
    # A knocker that keeps at it is a line each REFUSAL_REPEAT_S: the window does not slide.
    for _ in range(3):
        now[0] += REFUSAL_REPEAT_S * 0.6
        gate._log_refusal(b"m" * 40, "10.0.0.2")
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines == [
        f"refused a CURVE key that is not authorized, from 10.0.0.1: {'m' * 40}",
        f"refused a CURVE key that is not authorized, from 10.0.0.2: {'m' * 40}",
        f"refused a CURVE key that is not authorized, from 10.0.0.2: {'m' * 40}",
    ]


def test_keygen_never_leaves_a_secret_others_can_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyzmq writes the files under the umask (0644 under 022); keygen chmod'ed the
    secret only after it was written."""
    from broker import auth

    modes: list[int] = []
    create = zmq.auth.create_certificates

    def create_and_look(directory: Path, name: str) -> tuple[str, str]:
        made = create(directory, name)
        modes.append((Path(directory) / f"{name}.key_secret").stat().st_mode & 0o777)
        return made

    monkeypatch.setattr(zmq.auth, "create_certificates", create_and_look)
    old = os.umask(0o022)
    try:
        assert auth.keygen_main(["carol", "--dir", str(tmp_path)]) == 0
    finally:
        os.umask(old)
    assert modes == [0o600]
    assert (tmp_path / "carol.key").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "carol.key_secret").stat().st_mode & 0o777 == 0o600


def test_a_secret_key_every_user_can_read_is_warned_about(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    from broker.auth import load_keys

    (keys / "keys" / "broker.key_secret").chmod(0o640)
    load_keys(keys / "keys")
    assert not [r for r in caplog.records if "impersonate" in r.getMessage()]
    (keys / "keys" / "broker.key_secret").chmod(0o644)
    load_keys(keys / "keys")
    assert [r.levelname for r in caplog.records if "impersonate the broker" in r.getMessage()] == ["WARNING"]


def test_a_reload_says_a_new_broker_key_needs_a_restart(
    secure: RunningBroker, keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker.key_secret replaced (the old one leaked) is read at start only: the reload
    said "reloaded 2 authorized keys" and nothing else, and the leaked key went on serving."""
    secure.broker.reload()
    wait_for(lambda: any("reloaded 2 authorized keys" in r.getMessage() for r in caplog.records), 5)
    assert not any("holds another key" in r.getMessage() for r in caplog.records)
    running = secure.broker.keys
    assert running is not None
    (keys / "users" / "old-broker.key").write_bytes((keys / "keys" / "broker.key").read_bytes())
    zmq.auth.create_certificates(keys / "keys", "broker")  # a new pair, in place of the old
    caplog.clear()
    secure.broker.reload()
    wait_for(lambda: any("reloaded 2 authorized keys" in r.getMessage() for r in caplog.records), 5)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("broker.key_secret holds another key than the one this broker runs with" in m for m in warned), warned
    assert any(running.public.decode() in m and "restart the broker" in m for m in warned), warned
    with client(secure, "alice", curve(keys, "alice", "users/old-broker.key")) as alice:  # still the old key
        assert alice.state == "connected"


def test_a_keys_directory_without_the_broker_secret_says_it_is_missing(tmp_path: Path) -> None:
    """It said 'Invalid certificate file', as if the file were damaged (a mistyped --keys,
    or zchat-keygen broker not run yet)."""
    (tmp_path / "empty").mkdir()
    broker = [bin_path("zchat-broker"), "--host", HOST, "--port", "0", "--pub-port", "0", "--data", str(tmp_path / "d")]
    for keys in (tmp_path / "typo", tmp_path / "empty"):
        run = subprocess.run(
            [*broker, "--keys", str(keys)],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        assert run.returncode == 1, run.stderr
        said = (
            f"cannot read the secret key {keys}/broker.key_secret: there is no such file "
            f"(`zchat-keygen broker --dir {keys}` makes it)"
        )
        assert said in run.stderr, run.stderr


def test_a_sighup_while_the_broker_starts_is_a_reload_once_it_can(keys: Path) -> None:
    """A `systemctl reload` right after a start (the broker still reading its store or
    keys) ended it, exit 129 and not a line in the log. The start is held at a known
    point: its secret key is a FIFO, read once the store is open."""
    secret = keys / "keys" / "broker.key_secret"
    content = secret.read_bytes()
    secret.unlink()
    os.mkfifo(secret, 0o600)
    args = [bin_path("zchat-broker"), "--host", HOST, "--port", "0", "--pub-port", "0"]
    proc = subprocess.Popen(
        [*args, "--data", str(keys / "data"), "--keys", str(keys / "keys")], stderr=subprocess.PIPE, text=True
    )
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True).start()
    try:
        with secret.open("wb") as fifo:  # opened once the broker opens it to read
            proc.send_signal(signal.SIGHUP)
            fifo.write(content)
        wait_for(lambda: any("reloaded 2 authorized keys" in line for line in log), 10, what=lambda: (proc.poll(), log))
        assert any(" ready: requests on " in line for line in log), log
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log


def test_a_broker_with_no_authorized_users_says_nobody_can_connect(keys: Path) -> None:
    for path in (keys / "keys" / "authorized").iterdir():
        path.unlink()
    broker = BrokerProcess(keys / "data", extra=["--keys", str(keys / "keys")]).start()
    try:
        assert any("no authorized users: nobody can connect" in line for line in broker.log), broker.log
    finally:
        broker.kill()


def test_the_health_check_without_keys_says_a_broker_with_keys_wants_them(
    secure: RunningBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said only 'no answer … within 3 s', as for a broker that is down."""
    from broker import health

    assert health.main(["--host", HOST, "--port", str(secure.port), "--timeout", "1"]) == 1
    assert "answers only keys it knows: pass --keys DIR" in capsys.readouterr().err


def test_the_health_check_needs_only_the_brokers_public_key(secure: RunningBroker, keys: Path) -> None:
    """It read the broker's public key out of broker.key_secret: run from the host, that is
    root's (docker.md's chown), and elsewhere it meant copying the broker's secret."""
    from broker import health

    directory = keys / "keys"
    zmq.auth.create_certificates(directory, "health")
    (directory / "authorized" / "health.key").write_bytes((directory / "health.key").read_bytes())
    secure.broker.reload()
    (directory / "broker.key_secret").rename(keys / "elsewhere.key_secret")
    args = ["--host", HOST, "--port", str(secure.port), "--keys", str(directory), "--timeout", "2"]
    wait_for(lambda: health.main(args) == 0, 10)


def test_a_restart_restores_only_the_sessions_whose_keys_are_unchanged(
    keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sessions saved at a clean stop come back only for names that still have the key
    they had: bob's key replaced while the broker was down (a leaked one, say) and
    carol's removed, as a reload would have ended their sessions."""
    first = RunningBroker(keys / "data", keys_dir=keys / "keys").start()
    for name in ("carol",):
        zmq.auth.create_certificates(keys / "users", name)
        (keys / "keys" / "authorized" / f"{name}.key").write_bytes((keys / "users" / f"{name}.key").read_bytes())
    first.broker.reload()
    wait_for(lambda: any("added: carol" in r.getMessage() for r in caplog.records), 5)
    clients = [client(first, name, curve(keys, name)) for name in ("alice", "bob", "carol")]
    for c in clients:
        c.connect()
    first.stop()
    for c in clients:
        c.close(0)  # (their byes go nowhere: the broker is down)
    zmq.auth.create_certificates(keys / "users", "bob2")
    (keys / "keys" / "authorized" / "bob.key").write_bytes((keys / "users" / "bob2.key").read_bytes())
    (keys / "keys" / "authorized" / "carol.key").unlink()
    caplog.clear()
    second = RunningBroker(keys / "data", keys_dir=keys / "keys").start()
    try:
        lines = [r.getMessage() for r in caplog.records]
        assert any("restored 1 session saved at the last stop" in line for line in lines), lines
        assert second.broker.core.by_name.keys() == {"alice"}
        fresh = client(second, "bob", CurveKeys.load(keys / "users" / "bob2.key_secret", keys / "keys/broker.key"))
        try:
            fresh.connect()  # not held by the session of the old key
        finally:
            fresh.close(0)
    finally:
        second.stop()
