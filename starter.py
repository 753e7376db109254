"""Tollgate's command line: ``python starter.py --help``.

The development commands (``demo``, ``load``) join in where ``tollgate_dev`` is
installed, as it is in a checkout; a production install has the rest.
"""

from importlib.util import find_spec

from tollgate.ops.cli import run_as_program

if find_spec("tollgate_dev") is not None:
    import tollgate_dev.commands  # noqa: F401  (registers its commands on the CLI)

if __name__ == "__main__":
    run_as_program()
