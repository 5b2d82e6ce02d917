"""A TCP proxy for fault tests: it forwards a port to a broker's, and on command stalls
(a partition: nothing is forwarded either way, connections stay open and new ones are
accepted but carry nothing, as when a network vanishes without closing anything) or
drops every connection (an RST, as a NAT or firewall that forgets a flow).

One thread, ``select`` with a short timeout; no zmq. Close it (or use it as a context
manager) at the end of the test.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from types import TracebackType

HOST = "127.0.0.1"


class TcpProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        #: socket -> its other end (both directions of every connection).
        self._peers: dict[socket.socket, socket.socket] = {}
        #: Sockets that carry nothing (stall with new_too=False).
        self._dead: set[socket.socket] = set()
        self._lock = threading.RLock()  # _peers changes under it: stall() reads it
        self._stalled = False
        self._drop = False
        #: Connections accepted so far (a client's reconnects, each handshake it tries).
        self.accepted = 0
        #: Bytes handed to the upstream's connections so far (on loopback, in its receive
        #: queue once counted: a stopped broker reads them all in its next pass).
        self.forwarded = 0
        self._upstreams: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    def stall(self, *, new_too: bool = True) -> None:
        """Forward nothing, in either direction, on every connection, present or future;
        with ``new_too=False``, on the connections open now only (gone dead without closing,
        as a flow that a NAT forgot: a new connection works)."""
        with self._lock:
            if new_too:
                self._stalled = True
            else:
                self._dead.update(self._peers)

    def unstall(self) -> None:
        with self._lock:
            self._stalled = False
            self._dead.clear()

    def drop(self) -> None:
        """Reset every connection now (the next ones are forwarded as usual)."""
        with self._lock:
            self._drop = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "the proxy thread did not stop"

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _forget(self, sock: socket.socket, *, reset: bool = False) -> None:
        for end in (sock, self._peers.pop(sock, None)):
            if end is None:
                continue
            self._peers.pop(end, None)
            if reset:
                with contextlib.suppress(OSError):
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._dead.discard(end)
            self._upstreams.discard(end)
            end.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    stalled, drop, self._drop = self._stalled, self._drop, False
                    if drop:
                        for sock in list(self._peers):
                            self._forget(sock, reset=True)
                    watched = [self._listener] + ([] if stalled else [s for s in self._peers if s not in self._dead])
                readable, _, _ = select.select(watched, [], [], 0.02)
                for sock in readable:
                    if sock is self._listener:
                        conn, _ = self._listener.accept()
                        self.accepted += 1
                        try:
                            upstream = socket.create_connection((HOST, self.upstream_port), timeout=2)
                        except OSError:
                            conn.close()
                            continue
                        upstream.settimeout(None)
                        with self._lock:
                            self._peers[conn], self._peers[upstream] = upstream, conn
                            self._upstreams.add(upstream)
                        continue
                    with self._lock:
                        if self._stalled or sock in self._dead:
                            continue  # stalled while select() waited: not a byte more
                    peer = self._peers.get(sock)
                    if peer is None:
                        continue  # its pair went earlier in this pass
                    try:
                        data = sock.recv(65536)
                        if data:
                            peer.sendall(data)
                            if peer in self._upstreams:
                                self.forwarded += len(data)
                            continue
                    except OSError:
                        pass
                    with self._lock:
                        self._forget(sock)
        finally:
            for sock in list(self._peers):
                self._forget(sock)
            self._listener.close()
