"""A join storm into one room: what it costs the broker, and how long until every member has heard it.

    python -m bench.storm [--members N] [--gap S] [--runs R] [--rejoin]

N sessions, each with its SUB already subscribed to the room (as the zchat
client does before it joins), join one after another, each waiting for its
``joined`` and then ``--gap`` seconds: members coming back one by one, as
after a broker restart. Every member hears every join (N * N presence
events in all). Printed per run: the frames that
carried them, the broker's CPU and RSS growth over the storm, and the time
until the last member has heard the last join.

With all N joins sent at once, a loop pass reads many of them and sends them
to each member as one batch anyway; the storm that costs is the spread-out
one, each join in a pass of its own (broker/hold.py).

``--rejoin`` then has every member join the room again, all at once, as each
client's rejoin after a reconnect (a broker restart whose sessions were
restored): first with ``members: false`` (as the zchat client's rejoins ask),
then asking for the member list (as before that option); printed per way: the
bytes of the replies, the broker's CPU and RSS growth, the time until the last
reply.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zmq

from bench.proc import cpu_seconds, rss_kib
from bench.targets.zmq_family import Zchat
from zchat import protocol as p


def storm(members: int, gap: float, rejoin: bool = False) -> str:
    server = Zchat().start(Path(tempfile.mkdtemp(prefix="zchat-storm-")), None)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, 65536)
    socks: list[zmq.Socket[bytes]] = []
    try:
        pid = server.pid
        assert pid is not None
        dealers, subs = [], []
        for i in range(members):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.RCVHWM, 0)  # read only after the storm: none of it may be dropped
            sub.connect(str(server.endpoints["pub"]))
            sub.subscribe(p.room_topic("storm"))
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(str(server.endpoints["router"]))
            dealer.send(msgpack.packb({"type": "hello", "v": p.VERSION, "name": f"m{i}"}))
            subs.append(sub)
            dealers.append(dealer)
            socks += [sub, dealer]
        for dealer in dealers:
            if not dealer.poll(30_000):
                raise RuntimeError("no welcome within 30 s")
            dealer.recv()
        # The last SUB has had its subscription in long before the first join (ZeroMQ
        # sends it at connect): give libzmq a moment to apply them all.
        time.sleep(0.5)
        cpu0, rss0, t0 = cpu_seconds(pid), rss_kib(pid), time.monotonic()
        join = msgpack.packb({"type": "join", "room": "storm"})
        for dealer in dealers:
            dealer.send(join)
            if not dealer.poll(30_000):
                raise RuntimeError("no joined within 30 s")
            dealer.recv()
            if gap:
                time.sleep(gap)
        want = members * members
        frames = heard = 0
        poller = zmq.Poller()
        for sub in subs:
            poller.register(sub, zmq.POLLIN)
        deadline = time.monotonic() + 120
        while heard < want and time.monotonic() < deadline:
            for sub, _ in poller.poll(1000):
                while True:
                    try:
                        body = sub.recv_multipart(zmq.NOBLOCK)[1]
                    except zmq.Again:
                        break
                    frames += 1
                    heard += len(p.decode_many(body, p.MAX_REPLY_BYTES))
        took = time.monotonic() - t0
        cpu, grown = cpu_seconds(pid) - cpu0, rss_kib(pid) - rss0
        said = (
            f"{members} joins, {gap * 1000:g} ms apart: {heard:,} of {want:,} presence events in {frames:,} frames; "
            f"all heard after {took:.2f} s; broker CPU {cpu:.2f} s, RSS +{grown:,} KiB"
        )
        if rejoin:
            # The member list last: what the allocator keeps of its burst would hide the other's.
            for listed in (False, True):
                said += "\n  " + _rejoins(pid, dealers, listed)
        return said
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
        server.stop()


def _rejoins(pid: int, dealers: list[zmq.Socket[bytes]], listed: bool) -> str:
    """Every member joins the room again at once; the replies' bytes, broker CPU and RSS, time."""
    request = {"type": "join", "room": "storm"} if listed else {"type": "join", "room": "storm", "members": False}
    frame = msgpack.packb(request)
    cpu0, rss0, t0 = cpu_seconds(pid), rss_kib(pid), time.monotonic()
    for dealer in dealers:
        dealer.send(frame)
    replied = 0
    for dealer in dealers:
        if not dealer.poll(30_000):
            raise RuntimeError("no joined within 30 s")
        replied += len(dealer.recv())
    took = time.monotonic() - t0
    cpu, grown = cpu_seconds(pid) - cpu0, rss_kib(pid) - rss0
    how = "with the member list" if listed else "members: false"
    return (
        f"{len(dealers)} rejoins at once, {how}: replies {replied / 1e6:.2f} MB; "
        f"broker CPU {cpu:.2f} s, RSS +{grown:,} KiB; all answered after {took:.2f} s"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=300, help="sessions that join (default 300)")
    parser.add_argument("--gap", type=float, default=0.002, help="seconds between joins (default 0.002)")
    parser.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    parser.add_argument(
        "--rejoin", action="store_true", help="then every member joins again at once, without and with the member list"
    )
    args = parser.parse_args(argv)
    for _ in range(args.runs):
        print(storm(args.members, args.gap, args.rejoin), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
