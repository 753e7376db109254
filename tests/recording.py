"""Recording histories for tests/test_replay.py (``TOLLGATE_RECORD_HISTORY=1``).

The harness's worker encrypts payloads with a key made for the test session, which
is gone once the session ends; so a recorded history is written decrypted, and the
replayer reads it with the plain converter (and an encrypting worker still can: see
tests/test_codec.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict, ParseDict
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHandle

from tollgate.codec import EncryptionCodec, codec_from_settings
from tollgate.settings import Settings

HISTORIES = Path(__file__).parent / "histories"


def _decrypted(node: Any, codec: EncryptionCodec) -> Any:
    """``node`` (a history as JSON) with every encrypted payload in it decrypted."""
    if isinstance(node, list):
        return [_decrypted(item, codec) for item in node]
    if not isinstance(node, dict):
        return node
    if "data" in node and isinstance(node.get("metadata"), dict):
        payload = codec.decrypt(ParseDict(node, Payload()))
        return MessageToDict(payload)
    return {key: _decrypted(value, codec) for key, value in node.items()}


async def maybe_record(handle: WorkflowHandle[Any, Any], settings: Settings, name: str) -> None:
    """With TOLLGATE_RECORD_HISTORY set, save the history as ``tests/histories/<name>.json``."""
    if not os.environ.get("TOLLGATE_RECORD_HISTORY"):
        return
    history = await handle.fetch_history()
    codec = codec_from_settings(settings)
    data = history.to_json_dict()
    if codec is not None:
        data = _decrypted(data, codec)
    (HISTORIES / f"{name}.json").write_text(json.dumps(data))
