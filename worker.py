"""Run a Tollgate worker: ``python worker.py`` (settings from the environment)."""

from tollgate.worker import main

if __name__ == "__main__":
    main()
