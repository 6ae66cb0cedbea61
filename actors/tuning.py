"""Self-tuning of the inference actor: forward time per (threads, batch size) at the model's input size,
and the point with the highest throughput whose batch time stays within a latency budget.

Measured, not assumed: on a 2-core CPU the edge model does ~1.9× more frames/s at batch 1 than at
batch 8 (the issue's numbers), on a GPU large batches win. Triton ships a Model Analyzer for this; the
agent measures itself, at start and after every model swap.

A `Tuner` is a plan of timed passes, handed out one at a time (`next_probe`), so the actor can run
them back to back before it serves, or one between two live batches after a swap (serving then waits
for at most one pass, whose length the budget bounds). Per thread count it climbs the batch ladder
and stops at the first batch over the budget: bigger ones only take longer. Then the points within
the budget are timed again in rotation, one pass each per round, and compared on those passes only:
timed one after the other, a point that happened to run while the other actors were starting (or a
neighbour was busy) looked slower than it is, and the choice flipped between runs (measured on this
2-core box: batch 1 chosen although batch 4 served 1.5 × the frames/s).

The table is timed on an idle pipeline. Under load, the ingest's decoding and the scoring share the cores
and the memory bus with the forward pass, and on this box that flipped the order of batch 2 and batch 4.
So a `LoadCheck` follows each table: once the agent is saturated, the table's contenders serve live
batches in turns, and the one with the most frames/s under that load serves from then on.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Point:
    """One (threads, batch) cell of the table: its timed passes (after one untimed warm-up pass)."""

    threads: int
    batch: int
    seconds: list[float] = field(default_factory=list)
    warmed: bool = False
    failed: str | None = None
    rotation: list[float] = field(default_factory=list)  # the passes timed in rotation with the others

    @property
    def compared(self) -> list[float]:
        """The passes the point is compared on: those of the rotation once there are any."""
        return self.rotation or self.seconds

    @property
    def ms(self) -> float:
        """The typical batch time (median of the compared passes)."""
        return 1000.0 * statistics.median(self.compared) if self.compared else float("inf")

    @property
    def frames_per_second(self) -> float:
        """From the median pass, not the fastest: with other work on the cores, a pass on several threads
        waits at every barrier for its slowest thread, and that cost is the point's own, not noise to
        filter out (on this 2-core box two threads were often several times slower than one)."""
        return self.batch / statistics.median(self.compared) if self.compared else 0.0

    def row(self, budget_ms: float) -> dict:
        return {"threads": self.threads, "batch": self.batch, "ms": round(self.ms, 2) if self.compared else None,
                "frames_per_second": round(self.frames_per_second, 2),
                "passes": len(self.seconds) + len(self.rotation), "rotation_passes": len(self.rotation),
                "within_budget": self.failed is None and self.ms <= budget_ms, "failed": self.failed}


def best_point(rows: list[dict], budget_ms: float) -> dict:
    """The row with the most frames/s among those whose batch time is within the budget; when none is
    (a box too slow for the budget), the fastest batch: the least latency there is."""
    measured = [r for r in rows if r["failed"] is None and r["ms"] is not None]
    if not measured:
        raise ValueError("no measured point to choose from")
    within = [r for r in measured if r["ms"] <= budget_ms]
    if within:  # ties (equal throughput) go to the smaller batch, then to fewer threads
        return max(within, key=lambda r: (r["frames_per_second"], -r["batch"], -r["threads"]))
    return min(measured, key=lambda r: (r["ms"], r["batch"], r["threads"]))


class Tuner:
    """The table for one model: `next_probe()` → (threads, batch) to time, `record()` its seconds."""

    def __init__(self, threads: list[int], batches: list[int], budget_ms: float, min_seconds: float = 0.3,
                 min_passes: int = 3, max_passes: int = 30, rotation_passes: int = 5):
        if not threads or not batches:
            raise ValueError("a tuner needs at least one thread count and one batch size")
        self.threads, self.batches = sorted(set(threads)), sorted(set(batches))
        self.budget_ms, self.min_seconds = budget_ms, min_seconds
        self.min_passes, self.max_passes = min_passes, max_passes
        self.rotation_passes = rotation_passes
        self.points: dict[tuple[int, int], Point] = {}
        self._thread_i = self._batch_i = 0
        self._rotation: list[tuple[int, int]] | None = None  # the points timed in rotation, once climbed

    def next_probe(self) -> tuple[int, int] | None:
        """The next pass to time, or None once the table is complete."""
        while self._thread_i < len(self.threads):
            key = (self.threads[self._thread_i], self.batches[self._batch_i])
            point = self.points.setdefault(key, Point(*key))
            enough = len(point.seconds) >= self.max_passes or (
                len(point.seconds) >= self.min_passes and sum(point.seconds) >= self.min_seconds)
            if point.failed is None and not enough:
                return key
            if point.failed is None and point.ms <= self.budget_ms and self._batch_i + 1 < len(self.batches):
                self._batch_i += 1  # within budget: climb
            else:  # over budget, failed (e.g. out of memory) or the ladder's top: next thread count
                self._thread_i, self._batch_i = self._thread_i + 1, 0
        if self._rotation is None:
            within = [p for p in self.points.values() if p.failed is None and p.seconds and p.ms <= self.budget_ms]
            # Candidates: within the budget and at least half the best throughput of the climb (a
            # disturbed pass costs a point up to ~2 × here; further behind, it is not a contender).
            top = max((p.frames_per_second for p in within), default=0.0)
            near = [(p.threads, p.batch) for p in within if p.frames_per_second >= 0.5 * top]
            self._rotation = near if len(near) > 1 else []  # one candidate: nothing to compare
        if not self._rotation:
            return None
        # Round-robin: the candidate with the fewest rotation passes (the ladder's order on ties).
        key = min(self._rotation, key=lambda k: len(self.points[k].rotation))
        return key if len(self.points[key].rotation) < self.rotation_passes else None

    def record(self, threads: int, batch: int, seconds: float | None = None, error: str | None = None) -> None:
        point = self.points[(threads, batch)]
        if error is not None:
            point.failed = error
            if self._rotation:  # failed in rotation (e.g. memory taken by another process): out of it
                self._rotation = [k for k in self._rotation if k != (threads, batch)]
        elif seconds is None:
            raise ValueError("a pass is recorded with its seconds or with its error")
        elif not point.warmed:
            point.warmed = True  # the first pass of a point pays for allocations and kernel choice
        elif self._rotation:
            point.rotation.append(seconds)
        else:
            point.seconds.append(seconds)

    @property
    def done(self) -> bool:
        return self._thread_i >= len(self.threads) and self.next_probe() is None

    def table(self) -> list[dict]:
        return [p.row(self.budget_ms) for p in sorted(self.points.values(), key=lambda p: (p.threads, p.batch))]

    def best(self) -> dict:
        return best_point(self.table(), self.budget_ms)


def contenders(rows: list[dict], budget_ms: float) -> list[int]:
    """The batch sizes worth a second look at the chosen thread count: within the budget and at least half
    the chosen point's frames/s (the rule the rotation uses). Fewer than two: nothing to compare."""
    best = best_point(rows, budget_ms)
    near = sorted(r["batch"] for r in rows if r["threads"] == best["threads"] and r["failed"] is None
                  and r["ms"] is not None and r["ms"] <= budget_ms
                  and r["frames_per_second"] >= 0.5 * best["frames_per_second"])
    return near if len(near) > 1 else []


class LoadCheck:
    """The contenders of a finished table timed again on live batches, under the agent's own load.

    The table is timed while nothing else runs. Under load the ingest's decoding and the scoring share
    the cores and the memory bus, and the ranking can flip (measured on this 2-core box in 7 alternating
    rounds: alone, batch 2 did 1.15 × batch 4's frames/s; in the saturated agent, 0.83 × it; each in 6
    of the 7). So once the agent is saturated, the contenders take turns serving: `turn_batches` full
    batches each per turn, for `rounds` rounds, then the one with the most frames/s over its live passes
    (median batch time) within the budget serves. The caller passes only full batches taken while at
    least as many frames as the largest contender were still waiting (the same load for every
    contender: a batch of 1 is always full, and served to a quiet camera it would be timed on a quieter
    box), and none that also ran a shadow model. Live batch times include the hand-over to the forward
    thread, so they run a little above the table's.

    A check that has not finished `max_seconds` after it started (a line that never saturates the agent,
    contenders bigger than the ingest ever queues, a shadow on every batch) expires: the table's choice
    stays.
    """

    def __init__(self, batches: list[int], budget_ms: float, turn_batches: int = 3, rounds: int = 4,
                 max_seconds: float = 600.0, now: float | None = None):
        if any(type(b) is not int or b < 1 for b in batches):
            raise ValueError(f"a load check compares batch sizes (whole numbers >= 1), got {batches!r}")
        if len(set(batches)) < 2:
            raise ValueError("a load check needs at least two batch sizes to compare")
        self.batches, self.budget_ms = sorted(set(batches)), budget_ms
        self.turn_batches, self.rounds = turn_batches, rounds
        self.deadline = (time.monotonic() if now is None else now) + max_seconds
        self.seconds: dict[int, list[float]] = {b: [] for b in self.batches}  # per full batch

    @property
    def done(self) -> bool:
        return all(len(t) >= self.rounds * self.turn_batches for t in self.seconds.values())

    def expired(self, now: float) -> bool:
        return not self.done and now >= self.deadline

    def state(self, now: float) -> str:
        """done, expired, checking (a contender has live batches) or waiting (none yet)."""
        if self.done:
            return "done"
        if self.expired(now):
            return "expired"
        return "checking" if any(self.seconds.values()) else "waiting"

    def entry(self, now: float) -> dict:
        """The check as the actor's stats and saved tuning show it: state, contenders, live table."""
        return {"state": self.state(now), "batches": self.batches, "table": self.table()}

    def current(self) -> int:
        """The batch size to serve next: the one with the fewest finished turns (smaller first on ties)."""
        return min(self.batches, key=lambda b: (len(self.seconds[b]) // self.turn_batches, b))

    def saturated(self, waiting: int) -> bool:
        """Whether a batch taken with `waiting` frames left in the queue was taken under full load."""
        return waiting >= self.batches[-1]

    def record(self, batch: int, frames: int, seconds: float) -> None:
        """One served batch of `frames` frames at size `batch`, its forward pass `seconds` long."""
        if not self.done and batch == self.current() and frames == batch:
            self.seconds[batch].append(seconds)

    def table(self) -> list[dict]:
        rows = []
        for b in self.batches:
            timed = self.seconds[b]
            ms = 1000.0 * statistics.median(timed) if timed else None
            rows.append({"batch": b, "ms": round(ms, 2) if ms is not None else None,
                         "frames_per_second": round(1000.0 * b / ms, 2) if ms else None, "passes": len(timed),
                         "within_budget": ms is not None and ms <= self.budget_ms})
        return rows

    def best(self) -> int | None:
        """The batch size with the most live frames/s within the budget (ties: the smaller); None when
        none is, or the check did not finish (then the table's choice stays)."""
        within = [r for r in self.table() if r["within_budget"]] if self.done else []
        return max(within, key=lambda r: (r["frames_per_second"], -r["batch"]))["batch"] if within else None


def ladder(top: int) -> list[int]:
    """1, 2, 4, … up to `top`, and `top` itself."""
    out, n = [], 1
    while n < top:
        out.append(n)
        n *= 2
    return [*out, max(1, top)]
