"""Counters and histograms kept inside actors and read by the agent's /metrics (plain data, picklable)."""
from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Histogram:
    """Prometheus-style cumulative histogram: `counts[i]` observations ≤ buckets[i]; the last is +Inf."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += count
            out.append((bound, running))
        return out


@dataclass
class CameraStats:
    """Per-camera accounting. Once nothing is in flight: sent = processed + Σdropped + Σinvalid."""

    received: int = 0
    processed: int = 0
    anomalies: int = 0
    dropped: Counter = field(default_factory=Counter)
    invalid: Counter = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    last_seq: int | None = None
    gaps: int = 0
    # Things a camera did that lose no frame, counted once each: its sequence went back (`restart`),
    # repeated a seq (`repeat`) or leapt beyond max_seq_gap (`jump`); a capture ts far from our clock
    # (`clock`).
    events: Counter = field(default_factory=Counter)

    def accounted(self) -> int:
        return self.processed + sum(self.dropped.values()) + sum(self.invalid.values())

    def to_json(self) -> dict:
        return {"received": self.received, "processed": self.processed, "anomalies": self.anomalies,
                "dropped": dict(self.dropped), "invalid": dict(self.invalid), "last_seq": self.last_seq,
                "gaps": self.gaps, "events": dict(self.events),
                "latency": {"counts": self.latency.counts, "total": self.latency.total, "n": self.latency.n}}

    @classmethod
    def from_json(cls, data: dict) -> CameraStats:
        latency = data.get("latency", {})
        return cls(data["received"], data["processed"], data["anomalies"], Counter(data["dropped"]),
                   Counter(data["invalid"]),
                   Histogram(counts=list(latency.get("counts", [])), total=latency.get("total", 0.0),
                             n=latency.get("n", 0)), data.get("last_seq"), data.get("gaps", 0),
                   Counter(data.get("events", {})))
