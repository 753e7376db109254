"""The door remembers SKUs the catalog knew a moment ago (tollgate.orders.service)."""

from __future__ import annotations

from tollgate.orders.service import KnownSkus


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_known_sku_is_not_asked_again_until_its_time_is_up() -> None:
    clock = Clock()
    known = KnownSkus(ttl_seconds=60, clock=clock)
    assert known.not_known(["WIDGET", "GADGET", "WIDGET"]) == ["WIDGET", "GADGET"]
    known.learn(["WIDGET"])  # the catalog did not know GADGET: it is not remembered

    clock.now += 59
    assert known.not_known(["WIDGET", "GADGET"]) == ["GADGET"]
    clock.now += 1
    assert known.not_known(["WIDGET"]) == ["WIDGET"], "asked again once the minute is up"


def test_the_memory_is_bounded_and_the_oldest_learned_go_first() -> None:
    known = KnownSkus(size=2, clock=Clock())
    known.learn(["A", "B"])
    known.learn(["C"])
    assert known.not_known(["A", "B", "C"]) == ["A"]
