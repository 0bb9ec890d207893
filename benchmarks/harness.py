"""Benchmark results: every benchmark module returns :class:`Result` rows; ``make bench`` prints them as a table and
writes ``.bench/results.json`` (a list of {"name", "value", "unit", "baseline", "ratio"}).

``ratio`` is always "how many times better than the baseline" (baseline/value for lower-is-better units such as ms
and MiB, value/baseline for rates), computed from a baseline measured in the same run on the same machine.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

#: Units where a smaller value is better.
LOWER_IS_BETTER = {"ms", "us", "s", "MiB", "bytes"}


@dataclass
class Result:
    """One measured figure. ``baseline`` is the same figure for the baseline (predecessor design, or a goal when
    ``baseline_is_goal``), measured in the same run."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    goal: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Times better than the baseline, or None without one."""
        if self.baseline is None or self.value == 0 or self.baseline == 0:
            return None
        return self.baseline / self.value if self.unit in LOWER_IS_BETTER else self.value / self.baseline


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation; NaN for no samples."""
    if not samples:
        return float("nan")
    xs = sorted(samples)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(samples: Sequence[float]) -> float:
    """Median, NaN for no samples."""
    return statistics.median(samples) if samples else float("nan")


def write_results(results: Sequence[Result], path: Path) -> None:
    """Merge ``results`` into the JSON file at ``path`` (same names are replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing: dict[str, dict[str, object]] = {}
    if path.exists():
        for row in json.loads(path.read_text()):
            existing[str(row["name"])] = row
    for r in results:
        row = asdict(r)
        row["ratio"] = r.ratio
        existing[r.name] = row
    path.write_text(json.dumps(sorted(existing.values(), key=lambda x: str(x["name"])), indent=2))


def format_table(results: Sequence[Result]) -> str:
    """A fixed-width table: name, value, unit, baseline, ratio, goal."""
    lines = [f"{'name':52} {'value':>12} {'unit':6} {'baseline':>12} {'ratio':>8}  goal"]
    for r in results:
        base = f"{r.baseline:12.3f}" if r.baseline is not None else f"{'-':>12}"
        ratio = f"{r.ratio:7.1f}x" if r.ratio is not None else f"{'-':>8}"
        lines.append(f"{r.name:52} {r.value:12.3f} {r.unit:6} {base} {ratio}  {r.goal}")
    return "\n".join(lines)
