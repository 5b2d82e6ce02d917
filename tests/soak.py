"""A soak, run by hand (pytest runs a short one: tests/test_soak.py): alice writes at a
steady rate, either DMs to bob (``--kind dms``) or messages to #general, where bob
listens (``--kind rooms``). bob's connections go through proxies that reset every
connection every 1-3 s (with ``--alice-proxy``, alice's request connection too), and,
with ``--restarts term`` or ``kill``, every 4th of those the broker is stopped that way
and started again on the same data and ports.

At the end it checks what zchat promises: every message alice saw acknowledged reached
bob, once, in the order she wrote it; none she was told failed reached him. It prints
one line of counts (and the first few of anything wrong) and exits 1 if any promise was
broken::

    .venv/bin/python -m tests.soak --kind dms --seconds 40 --rate 300 --restarts kill --seed 13
    .venv/bin/python -m tests.soak --kind rooms --seconds 40 --rate 2000 --restarts kill --alice-proxy

Room messages are stored before they are acknowledged, so a killed broker loses none.
DMs are not stored: what a broker that is killed holds for a recipient's resume (those
handed to a connection that was reset just before) is lost, and may show here as
``missing_acked`` in a rare run (protocol.md, Direct messages).
"""

from __future__ import annotations

import argparse
import itertools
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from client.lib import Client, Event
from tests.conftest import HOST, BrokerProcess
from tests.tcp_proxy import TcpProxy

ROOM = "general"


@dataclass
class Outcome:
    """What one soak saw; ``broken`` lists the promises it found broken (empty: none)."""

    sent: int = 0
    acked: int = 0
    refused: int = 0
    got: int = 0
    #: Connection resets and broker restarts done while alice wrote.
    resets: int = 0
    restarts: int = 0
    broken: list[str] = field(default_factory=list)
    line: str = ""


def soak(
    kind: str = "dms",
    seconds: float = 40.0,
    rate: float = 300.0,
    restarts: str = "none",
    seed: int = 1,
    alice_proxy: bool = False,
    restart_every: int = 4,
    data: Path | None = None,
) -> Outcome:
    rng = random.Random(seed)
    data = data or Path(tempfile.mkdtemp(prefix=f"zchat-soak-{kind}-"))
    broker = BrokerProcess(data, extra=["--rate-limit", "0"]).start()
    proxies = [TcpProxy(broker.port), TcpProxy(broker.pub_port)]
    if alice_proxy:
        proxies.append(TcpProxy(broker.port))
    stop, bob_ready, alice_done = threading.Event(), threading.Event(), threading.Event()
    bob_got: list[str] = []
    done = {"resets": 0, "restarts": 0}

    def wanted(e: Event) -> bool:
        if kind == "dms":
            return e.type == "dm" and not e.own and bool(e.text)
        return e.type == "msg" and e.room == ROOM and not e.own and bool(e.text)

    def bob_main() -> None:
        bob = Client("bob", HOST, proxies[0].port, proxies[1].port)
        bob.connect()
        if kind == "rooms":
            bob.join(ROOM, members=False)
        bob_ready.set()
        done_at = None
        while done_at is None or time.monotonic() - done_at < 8:  # what is still on its way
            bob.pump(0.05)
            bob_got.extend(e.text or "" for e in bob.drain_events() if wanted(e))
            if done_at is None and alice_done.is_set():
                done_at = time.monotonic()
        bob.close(1)

    def chaos() -> None:
        nonlocal broker
        n = 0
        while not stop.wait(rng.uniform(1, 3)):
            n += 1
            if restarts != "none" and n % restart_every == 0:
                broker.kill(signal.SIGTERM if restarts == "term" else signal.SIGKILL)
                broker = broker.again()
                done["restarts"] += 1
            else:
                for proxy in proxies:
                    proxy.drop()
                done["resets"] += 1

    bob_thread = threading.Thread(target=bob_main)
    bob_thread.start()
    if not bob_ready.wait(10):
        raise SystemExit("bob could not connect")
    alice = Client("alice", HOST, proxies[2].port if alice_proxy else broker.port, broker.pub_port)
    alice.connect()
    if kind == "rooms":
        alice.join(ROOM, members=False)
    chaos_thread = threading.Thread(target=chaos)
    chaos_thread.start()
    texts: dict[str, str] = {}  # id -> text
    acked: set[str] = set()
    refused: dict[str, str] = {}
    own = "dm" if kind == "dms" else "msg"

    def note(events: list[Event]) -> None:
        for e in events:
            if e.type == own and e.own and e.id:
                acked.add(e.id)
            elif e.type == "error" and e.id:
                refused[e.id] = f"{e.code}: {e.message}"

    end = time.monotonic() + seconds
    i, next_at = 0, time.monotonic()
    while time.monotonic() < end:
        while next_at <= time.monotonic():
            i += 1
            text = f"{kind} {i}"
            texts[alice.dm("bob", text) if kind == "dms" else alice.send(ROOM, text)] = text
            next_at += 1 / rate
        alice.pump(max(0.0, next_at - time.monotonic()))
        note(alice.drain_events())
    stop.set()
    chaos_thread.join()
    left = alice.close(5, settle=5)
    note(alice.drain_events())
    alice_done.set()
    bob_thread.join()
    broker.kill(signal.SIGTERM)
    for proxy in proxies:
        proxy.close()

    got = set(bob_got)
    nums = [int(t.split()[1]) for t in bob_got]
    missing = [t for mid, t in texts.items() if mid in acked and t not in got]
    refused_but_got = [texts[mid] for mid in refused if mid in texts and texts[mid] in got]
    out_of_order = [(a, b) for a, b in itertools.pairwise(nums) if b < a]
    dups = len(bob_got) - len(got)
    out = Outcome(len(texts), len(acked), len(refused), len(bob_got), done["resets"], done["restarts"])
    out.line = (
        f"kind={kind} seed={seed} resets={out.resets} restarts={out.restarts} ({restarts}) "
        f"sent={len(texts)} acked={len(acked)} "
        f"refused={len(refused)} bob_got={len(bob_got)} dups={dups} out_of_order={len(out_of_order)} "
        f"missing_acked={len(missing)} refused_but_got={len(refused_but_got)} left_at_close={left} "
        f"connections={proxies[0].accepted}"
    )
    for what, items in (
        ("missing", missing),
        ("refused but got", refused_but_got),
        ("out of order", out_of_order),
        ("doubled", [dups] if dups else []),
    ):
        if items:
            out.broken.append(f"{what}: {items[:5]}")
    if refused:
        out.line += f"\n  refusals: {list(refused.values())[:5]}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--kind", choices=["dms", "rooms"], default="dms", help="what alice writes (default dms)")
    parser.add_argument("--seconds", type=float, default=40.0, help="how long alice writes (default 40)")
    parser.add_argument("--rate", type=float, default=300.0, help="messages a second (default 300)")
    parser.add_argument("--restarts", choices=["none", "term", "kill"], default="none")
    parser.add_argument("--seed", type=int, default=1, help="of the resets' and restarts' timing")
    parser.add_argument("--alice-proxy", action="store_true", help="reset alice's request connection too")
    args = parser.parse_args(argv)
    out = soak(args.kind, args.seconds, args.rate, args.restarts, args.seed, args.alice_proxy)
    print(out.line)
    for line in out.broken:
        print(f"  {line}")
    return 1 if out.broken else 0


if __name__ == "__main__":
    sys.exit(main())
