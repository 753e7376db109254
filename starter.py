"""Tollgate's command line: ``python starter.py --help``."""

from tollgate.cli import main

if __name__ == "__main__":
    main()
