"""Replay recorded order and message histories against today's workflow code.

A change that makes a workflow issue different commands for the same events
(reordered activities, a new timer, a removed step) breaks running orders on deploy;
the replayer fails here first.

Each generation of the workflow code keeps its histories, since executions started
under it may still be running when the next one deploys: ``*_regular_store`` were
recorded before the store's reads and writes became local activities,
``*_local_store`` before the moves before each step went into the step's activity,
``*_moves_in_steps`` before one patch marker stood for those two, and the plain names
by today's code. After an intentional, patched change, rename today's files after what
the change replaced and record new ones with ``TOLLGATE_RECORD_HISTORY=1`` on the tests
that save them (tests/recording.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tollgate.worker import WORKFLOWS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_recorded_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=list(WORKFLOWS), data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure


def test_every_lifecycle_has_a_recorded_history() -> None:
    kinds = {p.stem.split("_")[0] for p in HISTORIES}
    assert {"order", "message"} <= kinds, f"tests/histories/ lacks a lifecycle: {kinds}"
