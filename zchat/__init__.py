"""zchat: a multi-user chat over ZeroMQ.

Bots import the client library from here::

    from zchat import Client
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from client.lib import (
        BrokerAddress,
        BrokerUnreachable,
        Client,
        CurveKeys,
        Event,
        RequestError,
        ZchatError,
        parse_hosts,
    )
    from zchat.protocol import ErrorCode

__all__ = [
    "BrokerAddress",
    "BrokerUnreachable",
    "Client",
    "CurveKeys",
    "ErrorCode",
    "Event",
    "RequestError",
    "ZchatError",
    "__version__",
    "parse_hosts",
]


def __getattr__(name: str) -> Any:
    # Lazy, so that the broker (which imports zchat.protocol) never loads the client.
    if name == "ErrorCode":
        from zchat.protocol import ErrorCode  # noqa: PLC0415

        return ErrorCode
    if name in __all__:
        from client import lib  # noqa: PLC0415

        return getattr(lib, name)
    raise AttributeError(name)


def __dir__() -> list[str]:
    # What a REPL's completion and dir() offer: the lazy names too.
    return sorted({*globals(), *__all__})
