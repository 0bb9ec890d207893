"""The order in which fan-out builds and sends the groups of one update, so that subscribers are served earliest.

Every update is built group by group on one event loop, each group's writes starting as soon as its message is
encoded; a subscriber waits for the work of every group before its own. Groups differ in size and in how much new
work they need: views of an expiry, window and indicator set are shared (:meth:`Book.expiry_view`), so a group whose
views another group already advanced costs almost nothing. Greedy order: next the group with the most subscribers
per unit of remaining work (measured on the benchmark's 90 groups at 2,000 subscribers: the 1,000th subscriber's
message is ready after 3.9 ms of compute instead of 5.9 ms with largest-first; bench_stream).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence

#: Work of a group beyond its views (delta assembly, encoding the message), in strikes of view work.
GROUP_COST = 1.0
#: Work per strike of a view not yet advanced in this update (comparing and encoding it).
STRIKE_COST = 2.0


def cheapest_first(groups: Sequence[tuple[int, Sequence[tuple[Hashable, int]]]]) -> list[int]:
    """Indices of ``groups`` in sending order. Each group is ``(subscribers, [(view key, strikes), ...])``; views
    with the same key are shared (built once, by the first group that needs them).

    Greedy on ``subscribers / (GROUP_COST + STRIKE_COST × strikes of views not built yet)``. A group's score only
    rises when a view it shares gets built, so only those groups are rescored (heap entries of older scores are
    skipped): O((groups + shared views) log groups).
    """
    built: set[Hashable] = set()
    sharing: dict[Hashable, list[int]] = {}
    for i, (_, views) in enumerate(groups):
        for k, _ in views:
            sharing.setdefault(k, []).append(i)

    def score(i: int) -> float:
        subs, views = groups[i]
        return subs / (GROUP_COST + STRIKE_COST * sum(n for k, n in views if k not in built))

    current = [score(i) for i in range(len(groups))]
    heap = [(-current[i], i) for i in range(len(groups))]
    heapq.heapify(heap)
    done = [False] * len(groups)
    out: list[int] = []
    while heap:
        neg, i = heapq.heappop(heap)
        if done[i] or -neg != current[i]:
            continue
        done[i] = True
        out.append(i)
        for k, _ in groups[i][1]:
            if k in built:
                continue
            built.add(k)
            for j in sharing[k]:
                if not done[j]:
                    current[j] = score(j)
                    heapq.heappush(heap, (-current[j], j))
    return out
