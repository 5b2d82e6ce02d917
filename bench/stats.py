"""A log-linear latency histogram (HDR-style, ~0.8% precision) that merges across processes."""

from __future__ import annotations

from collections.abc import Iterable

#: Values below 2**_BITS are exact; above, each power of two has 2**(_BITS-1) buckets.
_BITS = 8
_HALF = 1 << (_BITS - 1)
_SIZE = 64 * _HALF + (1 << _BITS)


def _index(value: int) -> int:
    bits = value.bit_length()
    if bits <= _BITS:
        return value
    shift = bits - _BITS
    return (shift << (_BITS - 1)) + (value >> shift)


def _lower(index: int) -> int:
    shift = max(0, index // _HALF - 1)
    return (index - shift * _HALF) << shift


class Histogram:
    """Counts of non-negative integer values (nanoseconds here)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _SIZE
        self.total = 0

    def record(self, value: int) -> None:
        value = max(value, 0)
        bits = value.bit_length()
        if bits <= _BITS:
            self.counts[value] += 1
        else:
            shift = bits - _BITS
            self.counts[(shift << (_BITS - 1)) + (value >> shift)] += 1
        self.total += 1

    def to_sparse(self) -> dict[int, int]:
        return {i: c for i, c in enumerate(self.counts) if c}

    @classmethod
    def from_sparse(cls, parts: Iterable[dict[int, int]]) -> Histogram:
        hist = cls()
        for part in parts:
            for index, count in part.items():
                hist.counts[index] += count
                hist.total += count
        return hist

    def percentile(self, pct: float) -> float | None:
        """The value at ``pct`` (0-100), as the middle of its bucket; None when empty."""
        if not self.total:
            return None
        rank = max(1, round(self.total * pct / 100))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                low = _lower(index)
                high = _lower(index + 1)
                return (low + high - 1) / 2
        return float(_lower(len(self.counts) - 1))

    def summary_us(self) -> dict[str, float | None]:
        """p50/p99/p99.9/max in microseconds."""

        def us(v: float | None) -> float | None:
            return None if v is None else v / 1000

        return {
            "p50": us(self.percentile(50)),
            "p99": us(self.percentile(99)),
            "p999": us(self.percentile(99.9)),
            "max": us(self.percentile(100)),
        }
