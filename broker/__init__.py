"""zchat-broker: one process, ROUTER for requests and replies, PUB for room fan-out."""
