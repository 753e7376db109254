"""``python -m tollgate.api``: see :mod:`tollgate.api.server`."""

from tollgate.api.server import main

if __name__ == "__main__":
    main()
