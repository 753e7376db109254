"""The short chaos run: every fault once, then all together, and zero violations.

``make chaos`` runs the long version (60 s, 70 lifecycles); this one keeps ``make test``
quick while still killing workers, Temporal and Postgres for real.
"""

from __future__ import annotations

from pathlib import Path

from tollgate_dev.chaos import FAULTS, ChaosConfig, run_chaos


async def test_short_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    report = await run_chaos(ChaosConfig(duration=24, orders=14, messages=10, seed=7), tmp_path)
    print(
        f"\nchaos: {report.faults_injected}, {report.orders} orders {report.order_statuses}, "
        f"{report.messages} messages {report.message_statuses}, {report.seconds} s"
    )
    assert set(report.faults_injected) == set(FAULTS), "every fault was injected"
    assert report.orders == 14 and report.messages == 10
    for check in report.checks:
        assert check.checked > 0, check.name
        assert not check.violations, f"{check.name}: {check.violations}"
