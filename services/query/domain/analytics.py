"""Option-chain analytics (formulas as documented on ``GetOptionChainResponse`` in query_service.proto)."""

from __future__ import annotations

from collections.abc import Sequence


def pcr(put_total: float, call_total: float) -> float:
    """Put-call ratio Σput / Σcall (OI in contracts or day volume in contracts); 0 when Σcall is 0."""
    return float(put_total) / float(call_total) if call_total else 0.0


def max_pain(strikes: Sequence[float], call_oi: Sequence[int], put_oi: Sequence[int]) -> float:
    """The listed strike K* minimising the writers' payout Σ_K [call_oi(K)·max(0, K*−K) + put_oi(K)·max(0, K−K*)].

    ``strikes`` ascending (index points), OI in contracts (0 for a missing leg). Ties go to the lower strike.
    Raises ValueError for an empty chain. O(n²) over ≤ a few hundred strikes.
    """
    if not strikes:
        raise ValueError("empty chain")
    best_k, best = strikes[0], float("inf")
    for k in strikes:
        pain = 0.0
        for s, c, p in zip(strikes, call_oi, put_oi, strict=True):
            if k > s:
                pain += c * (k - s)
            elif s > k:
                pain += p * (s - k)
        if pain < best:
            best_k, best = k, pain
    return float(best_k)


def atm_iv(call_iv: float | None, put_iv: float | None) -> float | None:
    """Mean of the ATM call and put IV (percent); either alone when the other is missing; None when both are."""
    if call_iv is not None and put_iv is not None:
        return (call_iv + put_iv) / 2.0
    return call_iv if call_iv is not None else put_iv


def iv_rank(value: float, lo: float, hi: float) -> float:
    """(value − min) / (max − min) × 100, clamped to 0..100; 0 when the history is flat."""
    if hi <= lo:
        return 0.0
    return max(0.0, min(100.0, (value - lo) / (hi - lo) * 100.0))


def iv_percentile(below: int, total: int) -> float:
    """Share of history observations strictly below the current value × 100; 0 without history."""
    return below / total * 100.0 if total else 0.0


def oi_change_percent(change: int, base: int) -> float | None:
    """ΔOI as a percent of the OI it is measured from; None when that OI is 0."""
    return change / base * 100.0 if base else None
