"""A worker process SIGKILLed in the middle of a push fan-out, and a new one started.

Real processes (``python worker.py``), real kill. The retried attempt on the new
worker skips the devices recorded as pushed (Postgres, and the heartbeats of a slow
fan-out), and the per-device idempotency key absorbs the device pushed after the last
record. The ledger must show exactly one push per device.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

from tests.conftest import Harness
from tests.waiting import eventually
from tollgate.messages import store as message_store
from tollgate.messages.service import MessageService
from tollgate.messages.states import MessageStatus
from tollgate_dev.sandbox import FaultSpec
from tollgate_dev.stack import WorkerProcess

DEVICES = 8


async def _pushes(h: Harness, message_id: str) -> Counter[str]:
    ledger = await h.sandbox.ledger(message_id=message_id)
    return Counter(p.token for p in ledger.pushes if p.kind == "message")


async def test_worker_killed_mid_fan_out_pushes_every_device_exactly_once(
    h: Harness, tmp_path: Path
) -> None:
    queue = f"crash-{uuid.uuid4().hex[:8]}"
    env = h.process_env(queue)
    user, devices = await h.devices(DEVICES)
    # slow enough that the fan-out is surely mid-way when the worker dies
    await h.sandbox.set_fault("push", FaultSpec(latency_ms=250))
    first = WorkerProcess(env, log_file=tmp_path / "worker-1.log")
    second = WorkerProcess(env, log_file=tmp_path / "worker-2.log")
    service = MessageService(h.client, h.pool, queue)
    msg = h.message(
        user,
        push_heartbeat_timeout=timedelta(seconds=1),
        deadline=timedelta(seconds=60),
        read_window=timedelta(seconds=1),
    )
    requests_before = (await h.sandbox.request_counts())["push"]
    await first.start()
    try:
        handle = await service.send(msg)

        async def three_pushed() -> bool:
            return sum((await _pushes(h, msg.message_id)).values()) >= 3

        await eventually(three_pushed, what="three devices pushed")
        first.kill()
        pushed_before_kill = len(await _pushes(h, msg.message_id))
        assert 0 < pushed_before_kill < DEVICES, "the kill must land mid fan-out"

        await second.start()

        async def all_pushed() -> bool:
            facts = await message_store.deliveries(h.pool, msg.message_id)
            return sum(1 for f in facts if f.pushed_at) == DEVICES

        await eventually(all_pushed, every=0.05, what="the fan-out finished by the new worker")

        pushes = await _pushes(h, msg.message_id)
        requests = (await h.sandbox.request_counts())["push"] - requests_before
        print(
            f"\n{pushed_before_kill} devices pushed before SIGKILL; {requests} push requests for {DEVICES} devices"
        )
        assert pushes == {f"tok-{user}-{n}": 1 for n in range(DEVICES)}, pushes
        # The new attempt skipped every device recorded as pushed; only the one the kill
        # caught between the provider's answer and the record may be asked again.
        assert requests <= DEVICES + 1, requests
        await service.device_says(msg.message_id, devices[0], "delivered")
        result = await handle.result()
        assert result.status is MessageStatus.DELIVERED
        assert result.devices_pushed == sorted(devices)
        assert (await service.row(msg.message_id)).status is MessageStatus.DELIVERED
    finally:
        first.kill()
        await second.stop()
