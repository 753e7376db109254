"""A trace as a waterfall in the terminal: the span tree, when each span started, how
long it took, whether it failed, and a bar on the trace's timeline.

Temporal's spans are folded where they say one thing twice: an activity is scheduled
(``StartActivity:x``, which takes no time) and runs once per attempt
(``RunActivity:x``), so it is shown as one line, with a line per attempt under it when
it was retried. SQL and HTTP spans are named by what they did (``SQL UPDATE orders``,
``POST /payments/charges -> 201``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from rich.console import Group
from rich.table import Table
from rich.text import Text

from tollgate_dev.traces.store import SpanRecord

#: Width of the timeline column, in characters.
BAR_WIDTH = 28

_WITH_PREFIX = re.compile(r"^WITH\b.*?\)\s*(INSERT|UPDATE|SELECT|DELETE)\b", re.IGNORECASE)
#: The first write in a statement that begins with ``WITH``: a write in a CTE (the
#: insert-or-match's ``inserted AS (INSERT ...)``) is what the statement is for. A row
#: lock (``FOR UPDATE``) or an upsert's ``DO UPDATE`` is not a write of its own.
_FIRST_WRITE = re.compile(
    r"\b(INSERT\s+INTO|(?<!FOR )(?<!DO )UPDATE|DELETE\s+FROM)\s+(\w+)", re.IGNORECASE
)
_SPACES = re.compile(r"\s+")
_TEMPORAL_LABELS = {
    "RunWorkflow": "workflow",
    "StartWorkflow": "start workflow",
    "StartUpdateWithStartWorkflow": "start workflow (with update)",
    "StartChildWorkflow": "start child workflow",
    "SignalWorkflow": "signal",
    "SignalChildWorkflow": "signal child",
    "SignalExternalWorkflow": "signal",
    "HandleSignal": "handle signal",
    "HandleQuery": "query",
    "HandleUpdate": "update",
    "ValidateUpdate": "validate update",
    "StartWorkflowUpdate": "update",
    "QueryWorkflow": "query",
}


@dataclass(frozen=True)
class Line:
    """One line of the waterfall."""

    prefix: str
    label: str
    service: str | None
    start_ns: int
    end_ns: int
    status: str
    note: str = ""


def describe_sql(statement: str) -> str:
    """``SQL <verb> <what>``, short: the statement's own first words, with Tollgate's
    ``WITH writer AS (...)`` preamble skipped to the statement it guards."""
    flat = _SPACES.sub(" ", statement).strip().rstrip(";")
    write = _FIRST_WRITE.search(flat) if flat[:4].upper() == "WITH" else None
    if write is not None:
        return f"SQL {write.group(1).split(' ')[0].upper()} {write.group(2)}"
    match = _WITH_PREFIX.match(flat)
    if match is not None:
        flat = flat[match.start(1) :]
    words = flat.split(" ")
    verb = words[0].upper() if words else ""
    target = ""
    for keyword in ("FROM", "INTO", "UPDATE"):
        upper = [w.upper() for w in words]
        if keyword in upper[: 12 if verb == "SELECT" else 4]:
            index = upper.index(keyword)
            if keyword == "UPDATE" and index == 0 and len(words) > 1:
                target = words[1]
                break
            if keyword != "UPDATE" and index + 1 < len(words):
                target = words[index + 1]
                break
    if verb == "SELECT" and not target:
        rest = " ".join(words[1:])
        return f"SQL SELECT {rest[:40]}" + ("..." if len(rest) > 40 else "")
    return f"SQL {verb} {target}".strip()


def _http(span: SpanRecord) -> str | None:
    attrs = span.attributes
    method = attrs.get("http.request.method") or attrs.get("http.method")
    if method is None:
        return None
    if span.kind == "server":
        route = attrs.get("http.route") or attrs.get("http.target") or ""
        status = attrs.get("http.response.status_code") or attrs.get("http.status_code")
        return f"serve {method} {route} -> {status}"
    url = str(attrs.get("url.full") or attrs.get("http.url") or "")
    status = attrs.get("http.response.status_code") or attrs.get("http.status_code") or "-"
    return f"{method} {urlsplit(url).path} -> {status}"


def label_of(span: SpanRecord) -> str:
    """What a span did, in a few words."""
    statement = span.attributes.get("db.statement") or span.attributes.get("db.query.text")
    if isinstance(statement, str):
        return describe_sql(statement)
    http = _http(span)
    if http is not None:
        return http
    kind, _, rest = span.name.partition(":")
    if rest and kind in _TEMPORAL_LABELS:
        return f"{_TEMPORAL_LABELS[kind]} {rest}"
    return span.name


def _lines(spans: Sequence[SpanRecord]) -> Iterator[Line]:
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    orphans: dict[str, list[SpanRecord]] = {}
    roots: list[SpanRecord] = []
    for span in by_id.values():
        parent = span.parent_span_id
        if parent and parent in by_id:
            children.setdefault(parent, []).append(span)
        elif parent:
            orphans.setdefault(parent, []).append(span)
        else:
            roots.append(span)
    for kids in (*children.values(), *orphans.values()):
        kids.sort(key=lambda s: s.start_ns)

    def walk(
        span: SpanRecord, prefix: str, last: bool, parent_service: str | None
    ) -> Iterator[Line]:
        branch = prefix + ("└─ " if last else "├─ ") if prefix or parent_service else ""
        below = prefix + ("   " if last else "│  ") if branch else ""
        service = span.service if span.service != parent_service else None
        kids = children.get(span.span_id, [])
        kind, _, rest = span.name.partition(":")
        attempts = [k for k in kids if k.name == f"RunActivity:{rest}"]
        if kind == "StartActivity" and attempts and len(attempts) == len(kids):
            local = bool(attempts[0].attributes.get("tollgate.local"))
            what = f"{'local activity' if local else 'activity'} {rest}"
            if len(attempts) == 1:
                only = attempts[0]
                yield _line(only, branch, what, service)
                yield from walk_children(only, below, span.service)
                return
            first, final = attempts[0], attempts[-1]
            yield Line(
                branch,
                f"{what} ({len(attempts)} attempts)",
                service,
                first.start_ns,
                max(a.end_ns for a in attempts),
                final.status,
            )
            for i, attempt in enumerate(attempts):
                is_last = i == len(attempts) - 1
                number = attempt.attributes.get("tollgate.attempt", i + 1)
                yield _line(
                    attempt, below + ("└─ " if is_last else "├─ "), f"attempt {number}", None
                )
                yield from walk_children(
                    attempt, below + ("   " if is_last else "│  "), span.service
                )
            return
        yield _line(span, branch, label_of(span), service)
        yield from walk_children(span, below, span.service)

    def walk_children(span: SpanRecord, prefix: str, service: str) -> Iterator[Line]:
        kids = children.get(span.span_id, [])
        for i, kid in enumerate(kids):
            yield from walk(kid, prefix, i == len(kids) - 1, service)

    tops: list[tuple[int, SpanRecord | str]] = [(r.start_ns, r) for r in roots]
    tops += [(min(s.start_ns for s in kids), parent) for parent, kids in orphans.items()]
    tops.sort(key=lambda t: t[0])
    for _, top in tops:
        if isinstance(top, SpanRecord):
            yield from walk(top, "", True, None)
            continue
        kids = orphans[top]
        yield Line(
            "",
            f"(span {top[:8]} not received: a workflow's run span is sent when the run ends)",
            None,
            kids[0].start_ns,
            max(k.end_ns for k in kids),
            "unset",
        )
        for i, kid in enumerate(kids):
            yield from walk(kid, "", i == len(kids) - 1, "")


def _line(span: SpanRecord, prefix: str, label: str, service: str | None) -> Line:
    note = ""
    if span.status == "error" and span.status_message:
        note = span.status_message
    return Line(prefix, label, service, span.start_ns, span.end_ns, span.status, note)


def format_duration(ns: int) -> str:
    """``0.4 ms``, ``12 ms``, ``1.23 s``."""
    ms = ns / 1e6
    if ms < 1:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.2f} s"


def _bar(line: Line, t0: int, total: int) -> Text:
    if total <= 0:
        return Text("▏")
    begin = int((line.start_ns - t0) / total * BAR_WIDTH)
    length = (line.end_ns - line.start_ns) / total * BAR_WIDTH
    begin = min(begin, BAR_WIDTH - 1)
    cells = max(1, round(length))
    style = "red" if line.status == "error" else "cyan"
    mark = "█" * min(cells, BAR_WIDTH - begin) if length >= 0.5 else "▏"
    return Text(" " * begin) + Text(mark, style=style)


def waterfall(spans: Sequence[SpanRecord], *, title: str = "") -> Group:
    """The trace as a table: tree, start (from the trace's first span), duration,
    status, and a bar on the timeline."""
    if not spans:
        return Group(Text("no spans"))
    lines = list(_lines(spans))
    t0 = min(line.start_ns for line in lines)
    t1 = max(line.end_ns for line in lines)
    errors = sum(1 for s in spans if s.status == "error")
    heading = Text(title + "  " if title else "", style="bold")
    heading += Text(
        f"trace {spans[0].trace_id}: {len(spans)} spans, {format_duration(t1 - t0)}"
        + (f", {errors} with errors" if errors else "")
    )
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("span", overflow="fold")
    table.add_column("start", justify="right")
    table.add_column("took", justify="right")
    table.add_column("status")
    table.add_column("timeline", no_wrap=True)
    for line in lines:
        label = Text(line.prefix, style="dim") + Text(line.label)
        if line.service:
            label += Text(f"  [{line.service}]", style="dim")
        if line.note:
            label += Text(f"  {line.note}", style="red")
        status = Text(line.status if line.status != "unset" else "", style=_style(line.status))
        table.add_row(
            label,
            f"+{format_duration(line.start_ns - t0)}",
            format_duration(line.end_ns - line.start_ns),
            status,
            _bar(line, t0, t1 - t0),
        )
    return Group(heading, table)


def _style(status: str) -> str:
    return {"error": "bold red", "ok": "green"}.get(status, "")
