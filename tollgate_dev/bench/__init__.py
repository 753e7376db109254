"""``make bench``: Tollgate's lifecycles against bare Temporal baselines, in one run.

On one server, in one run: orders and messages one at a time and at several levels in
flight (closed loops), bare workflows of as many no-op activities as each lifecycle
runs, the gate's transitions per second with and without its trigger and audit, and
the CPU the worker and the Temporal server spend per lifecycle. The result is a table
(with the issue's target ratios), a JSON file and a chart under ``<state_dir>/bench/``.

Nothing is imported here: Temporal's workflow sandbox imports this package on the way
to the baseline workflows (``tollgate_dev.bench.baseline``), and must find no I/O.
"""
