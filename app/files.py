"""Files written whole: a reader (or a power cut) finds the old content or the new, never a part.

Used by the embedded default's pending folder (app/pending.py) and broker folder
(app/folder_broker.py).
"""
import contextlib
import errno
import os
import tempfile
from pathlib import Path


def write_whole(path: Path, data: bytes, sync: bool = True) -> None:
    """Write `path` whole or not at all: a temporary file of its own, renamed; with `sync`, fsynced with its folder."""
    # The temporary name starts with a dot and ends in .tmp: neither the pending folder's
    # `*.json` nor kombu's `<name>.<queue>.msg` readers take it.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that the names created, renamed or removed in it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems cannot fsync a folder
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
