"""Per-shard reports and the one summary line every stage prints.

A report travels from the worker that made a shard to the driver (and into the shard's stats
json), so it holds only plain data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ShardReport:
    shard: int
    rows_in: int
    rows_out: int
    """Rows that carry a usable payload (e.g. an image); every input row is still written."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed rows by reason; rows_in == rows_out + sum(failures.values())."""
    seconds: float = 0.0


@dataclass
class StageSummary:
    stage: str
    rows_in: int = 0
    rows_out: int = 0
    failures: Counter = field(default_factory=Counter)
    shards_done: int = 0
    shards_skipped: int = 0
    shards_failed: dict[int, str] = field(default_factory=dict)
    """Shards whose task raised, with the error: reported, never fatal to the other shards."""
    seconds: float = 0.0

    def add(self, report: ShardReport) -> None:
        self.rows_in += report.rows_in
        self.rows_out += report.rows_out
        self.failures.update(report.failures)
        self.shards_done += 1

    def line(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.failures.items()))
        text = (
            f"{self.stage}: rows in {self.rows_in}, rows out {self.rows_out}, "
            f"failed {sum(self.failures.values())}{f' ({reasons})' if reasons else ''}; "
            f"shards done {self.shards_done}, skipped {self.shards_skipped} (already finished), "
            f"failed {len(self.shards_failed)}; {self.seconds:.1f} s"
        )
        return text

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "failures": dict(sorted(self.failures.items())),
            "shards_done": self.shards_done,
            "shards_skipped": self.shards_skipped,
            "shards_failed": {str(k): v for k, v in self.shards_failed.items()},
            "seconds": round(self.seconds, 3),
        }
