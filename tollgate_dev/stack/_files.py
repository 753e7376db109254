"""Files of the local stack's state that only its owner may read.

The state directory holds the payload key, the codec server's credential, the Postgres
owner's password and logs that quote requests; on a shared machine none of that is
for other local users. Directories are made 0700 and files 0600 when created, and
tightened when an earlier run (or an older Tollgate) left them looser.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from tollgate_dev.stack._process import StackError, logger

PRIVATE_FILE = 0o600
PRIVATE_DIRECTORY = 0o700
#: A private directory that one other account (the Postgres server's) may walk through
#: to reach its own data, without listing or reading anything else in it.
GROUP_TRAVERSABLE_DIRECTORY = 0o710


def private_directory(path: Path, *, traverse_gid: int | None = None) -> None:
    """Create ``path`` if needed and leave it 0700, owned by us.

    With ``traverse_gid`` the directory's group becomes that group and it gets 0710:
    members may pass through it (Postgres, run as its own account when we are root,
    must reach its data directory inside) but not list or read it.
    """
    path.mkdir(mode=PRIVATE_DIRECTORY, parents=True, exist_ok=True)
    mode = PRIVATE_DIRECTORY
    if traverse_gid is not None:
        if path.stat().st_gid != traverse_gid:
            os.chown(path, -1, traverse_gid)
        mode = GROUP_TRAVERSABLE_DIRECTORY
    _set_mode(path, mode)


def tighten_file(path: Path) -> None:
    """Take away every group and other permission from an existing ``path``."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & 0o077:
        _set_mode(path, current & 0o700)


def ensure_secret_file(path: Path, make: Callable[[], str], *, what: str) -> str:
    """The secret held in ``path``; ``make()`` is written there first if it is missing.

    The file is created 0600 and published atomically (a concurrent caller sees either
    no file or the whole secret), holding the secret as one line; an existing file with
    looser permissions is tightened. ``what`` names the secret in errors, which never
    quote it.
    """
    try:
        return _read_secret(path, what)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=PRIVATE_DIRECTORY, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    try:
        os.write(fd, f"{make()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)  # Fails if another process published one meanwhile.
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    logger.info("created %s (%s)", path, what)
    return _read_secret(path, what)


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise StackError(f"{what}: {path} could not be read: {exc}") from None
    secret = text.strip()
    if not secret:
        raise StackError(f"{what}: {path} is empty; delete it to have a new one generated")
    tighten_file(path)
    return secret


def _set_mode(path: Path, mode: int) -> None:
    if stat.S_IMODE(path.stat().st_mode) == mode:
        return
    try:
        path.chmod(mode)
    except PermissionError as exc:
        raise StackError(f"could not restrict {path} to mode {mode:04o}: {exc}") from None
    logger.debug("restricted %s to mode %04o", path, mode)
