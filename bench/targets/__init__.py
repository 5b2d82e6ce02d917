"""The systems under test, by name."""

from __future__ import annotations

from collections.abc import Callable

from bench.targets.base import Target


def _zchat() -> Target:
    from bench.targets.zmq_family import Zchat

    return Zchat("full")


def _zchat_normal() -> Target:
    from bench.targets.zmq_family import Zchat

    return Zchat("normal")


def _naive() -> Target:
    from bench.targets.zmq_family import Naive

    return Naive()


def _echo() -> Target:
    from bench.targets.zmq_family import ZmqEcho

    return ZmqEcho()


def _raw() -> Target:
    from bench.targets.zmq_family import RawPubSub

    return RawPubSub()


def _zchat_bp(brokers: int) -> Callable[[], Target]:
    def make() -> Target:
        from bench.targets.zchat_bp import ZchatBackplane

        return ZchatBackplane(brokers)

    return make


def _redis() -> Target:
    from bench.targets.redis_t import Redis

    return Redis()


def _mosquitto() -> Target:
    from bench.targets.mqtt_t import Mosquitto

    return Mosquitto()


def _nats() -> Target:
    from bench.targets.nats_t import Nats

    return Nats()


def _irc() -> Target:
    from bench.targets.irc_t import Ngircd

    return Ngircd()


#: Brokers sharing one Redis backplane in the scale-out group (targets zchat-bp-1, -2, -4).
SCALE_OUT = (1, 2, 4)
FACTORIES: dict[str, Callable[[], Target]] = {
    "zchat": _zchat,
    "zchat-normal": _zchat_normal,
    "naive": _naive,
    "raw": _raw,
    "zmq-echo": _echo,
    **{f"zchat-bp-{n}": _zchat_bp(n) for n in SCALE_OUT},
    "redis": _redis,
    "mosquitto": _mosquitto,
    "nats": _nats,
    "ngircd": _irc,
}
PEERS = ("redis", "mosquitto", "nats", "ngircd")


def get_target(name: str) -> Target:
    return FACTORIES[name]()
