"""The resume token of ``zchat --name NAME``, kept between runs on this machine.

A ``zchat`` that was killed (SIGKILL, a crash, the machine's power) leaves its
session on the broker for 3 heartbeats, and its name with it: started again at
once, it met ``name_taken`` for up to 15 s (a script under systemd's
``Restart=always`` failed again and again). With the token of that session, it
takes the session back at once, as the library does after a network blip.

One file per name and broker, in ``$XDG_STATE_HOME/zchat/sessions`` (by default
``~/.local/state/zchat/sessions``), readable by its user only: the token is a
secret (with it, anyone who reaches the broker is that user until the session
ends; with ``--keys``, only with that user's key too). A running ``zchat`` holds
a lock on its file, so a second ``zchat --name NAME`` on this machine does not
take the first one's session away from it: it says hello without the token and
meets ``name_taken``, as before. The file stays after a clean exit too (see
:meth:`SavedToken.close`); one that never got a token (a run that could not
connect) is removed. A session resumes under the spelling of its name only (the
broker's rule), so the file is the spelling's; a host name's case does not matter.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path

from client.lib import BrokerAddress
from zchat import protocol as p


def state_dir() -> Path:
    """Where zchat keeps its state: ``$XDG_STATE_HOME/zchat``, by default ``~/.local/state/zchat``."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    return (Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state") / "zchat"


class SavedToken:
    """The token file of one name and broker, locked by this process while it is open."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def open(cls, name: str, address: BrokerAddress, directory: Path | None = None) -> SavedToken | None:
        """The file for ``name`` at ``address``, locked; None when another process holds
        it (a ``zchat`` of that name runs here) or it cannot be made (then there is
        simply no token: the chat works as it did without)."""
        if not p.is_name(name):
            return None  # (refused by the client later; never a path of its making)
        try:
            directory = directory or state_dir() / "sessions"
        except (RuntimeError, KeyError):  # no home directory to be found
            return None
        # (Names are safe in a file name; a host is whatever was typed.)
        host = re.sub(r"[^a-z0-9_.:\[\]-]", "_", address.host.lower())
        path = directory / f"{name}@{host}_{address.port}"
        for _ in range(8):
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except OSError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return None
            # A run that held it may have removed it (close) between our open and our lock:
            # then ours is a lock on a file no longer at the path, and a third run could lock
            # a new one there. Locked, the file must still be the path's; else open again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except OSError:
                same = False
            if same:
                return cls(path, fd)
            os.close(fd)
        return None

    def read(self) -> str | None:
        """The saved token, if there is one."""
        try:
            text = os.pread(self._fd, 256, 0).decode("utf-8").strip()
        except (OSError, UnicodeError):
            return None
        return text or None

    def write(self, token: str | None) -> None:
        """Keep ``token`` (None: none) for the next run. A failure (a full disk) costs only
        the next run's quick resume, so it is not raised."""
        with contextlib.suppress(OSError):
            data = (token or "").encode("utf-8")
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)  # written before a crash that it is there for

    def close(self) -> None:
        """Release the lock. The token stays, after a clean exit too: a bye sent as the
        broker stopped (a reboot stops both) may never be read, and the broker then saves
        the session for its next start, holding the name until its token takes it back
        (emptied, the next run met name_taken for 15 s). The token of a session that did
        end takes nothing: a hello with it makes a new session. A file with no token (a
        run that never connected: a mistyped port, say) is removed, under the lock (see
        :meth:`open`): else one was left for every name and port ever tried."""
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_size == 0:
                os.unlink(self.path)
        os.close(self._fd)
