"""The naive forwarder: the least a ZeroMQ chat broker can do, as the limit to compare with.

ROUTER -> unpack -> stamp -> pack -> PUB. No validation, no sessions, no store,
no acks. ``python -m bench.naive --port 0 --pub-port 0`` prints where it listens.

With ``--echo`` it is libzmq and nothing else: the ROUTER sends every message
back as it came, the PUB only holds its connections. The idle benchmark uses it
to show what the two ZeroMQ connections of a client cost any broker as they
carry traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import msgpack
import zmq


def serve(port: int, pub_port: int) -> None:
    ctx = zmq.Context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    router.bind(f"tcp://127.0.0.1:{port or '*'}")
    pub.bind(f"tcp://127.0.0.1:{pub_port or '*'}")
    where = router.getsockopt_string(zmq.LAST_ENDPOINT), pub.getsockopt_string(zmq.LAST_ENDPOINT)
    print(f"ready: requests on {where[0]}, room events on {where[1]}", flush=True)
    seqs: dict[str, int] = {}
    while True:
        identity, frame = router.recv_multipart()
        env = msgpack.unpackb(frame)
        room = env["room"]
        seqs[room] = seq = seqs.get(room, 0) + 1
        env.update(seq=seq, ts=time.time_ns() // 1_000_000)
        env["from"] = env["sender"] = identity.hex()
        pub.send_multipart([room.encode() + b"\0", msgpack.packb(env)])


def echo(port: int, pub_port: int) -> None:
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, 100_000)
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    router.bind(f"tcp://127.0.0.1:{port or '*'}")
    pub.bind(f"tcp://127.0.0.1:{pub_port or '*'}")
    where = router.getsockopt_string(zmq.LAST_ENDPOINT), pub.getsockopt_string(zmq.LAST_ENDPOINT)
    print(f"ready: requests on {where[0]}, room events on {where[1]}", flush=True)
    while True:
        router.send_multipart(router.recv_multipart())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pub-port", type=int, default=0)
    parser.add_argument("--echo", action="store_true", help="echo every request, publish nothing (libzmq alone)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        (echo if args.echo else serve)(args.port, args.pub_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
