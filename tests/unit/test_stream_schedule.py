"""The sending order of an update's groups (services/stream/domain/schedule.py)."""

from __future__ import annotations

import random

from services.stream.domain.schedule import GROUP_COST, STRIKE_COST, cheapest_first

Groups = list[tuple[int, list[tuple[str, int]]]]


def _steps(groups: Groups, order: list[int]) -> list[tuple[float, int]]:
    """Per step of ``order``: (score of the group taken, in the cost model; subscribers served so far)."""
    built: set[str] = set()
    served = 0
    out = []
    for i in order:
        subs, views = groups[i]
        cost = GROUP_COST + STRIKE_COST * sum(n for k, n in views if k not in built)
        built.update(k for k, _ in views)
        served += subs
        out.append((subs / cost, served))
    return out


def _work_to_half(groups: Groups, order: list[int]) -> float:
    """Work (cost model) done before half of the subscribers have their message."""
    total = sum(s for s, _ in groups)
    built: set[str] = set()
    work = 0.0
    served = 0
    for i in order:
        subs, views = groups[i]
        work += GROUP_COST + STRIKE_COST * sum(n for k, n in views if k not in built)
        built.update(k for k, _ in views)
        served += subs
        if 2 * served >= total:
            break
    return work


def _naive(groups: Groups) -> list[int]:
    """Greedy without the heap: rescore every remaining group at every step."""
    built: set[str] = set()
    left = list(range(len(groups)))
    out = []
    while left:
        scores = {i: groups[i][0] / (GROUP_COST + STRIKE_COST * sum(n for k, n in groups[i][1] if k not in built))
                  for i in left}
        best = max(left, key=lambda i: (scores[i], -i))
        left.remove(best)
        out.append(best)
        built.update(k for k, _ in groups[best][1])
    return out


def _random_groups(rnd: random.Random, n: int, keys: int) -> Groups:
    names = [f"v{i}" for i in range(keys)]
    return [(rnd.randint(1, 50), [(k, rnd.choice([11, 21, 31])) for k in rnd.sample(names, rnd.randint(1, 3))])
            for _ in range(n)]


def test_edge_cases() -> None:
    assert cheapest_first([]) == []
    assert cheapest_first([(3, [])]) == [0]


def test_shared_views_make_a_group_cheap() -> None:
    # group 1 is smaller than group 2 but shares group 0's view, so it costs almost nothing after group 0
    assert cheapest_first([(40, [("a", 21)]), (10, [("a", 21)]), (30, [("b", 31)])]) == [0, 1, 2]
    # as many subscribers on a smaller window go first
    assert cheapest_first([(10, [("x", 31)]), (10, [("y", 11)])]) == [1, 0]


def test_heap_greedy_takes_the_groups_that_rescoring_everything_takes() -> None:
    rnd = random.Random(3)
    for _ in range(300):
        groups = _random_groups(rnd, rnd.randint(1, 25), 12)
        got = cheapest_first(groups)
        assert sorted(got) == list(range(len(groups)))
        assert _steps(groups, got) == _steps(groups, _naive(groups))  # same scores (ties may differ)


def test_half_the_subscribers_wait_for_less_work_than_with_largest_first() -> None:
    rnd = random.Random(9)
    gains = []
    for _ in range(100):
        groups = _random_groups(rnd, 40, 20)
        largest = sorted(range(len(groups)), key=lambda i: -groups[i][0])
        gains.append(_work_to_half(groups, largest) / _work_to_half(groups, cheapest_first(groups)))
    assert min(gains) > 0.9
    assert sorted(gains)[50] > 1.1
