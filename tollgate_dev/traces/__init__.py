"""Traces without Docker: the local stack's OTLP receiver, its files, and the waterfall
``starter.py order trace`` and ``message trace`` print."""

from tollgate_dev.traces.receiver import create_receiver_app, decode
from tollgate_dev.traces.store import SpanRecord, TraceStore
from tollgate_dev.traces.waterfall import waterfall

__all__ = ["SpanRecord", "TraceStore", "create_receiver_app", "decode", "waterfall"]
