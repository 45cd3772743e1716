"""Atomic file writes that respect the umask.

``atomic_write(path, writer)`` writes through a temporary file in the target's folder,
flushes and fsyncs it, and renames it onto ``path``. A crash or an exception at any
moment leaves either the old file or the new one, never a half-written file, and the
temporary file is removed on failure. The new file gets the permissions an ordinary
``open(path, "w")`` would give it (``0o666`` minus the umask), unlike
``tempfile.mkstemp``, whose files are always ``0o600``.
"""
import os
import secrets

__all__ = ["atomic_write", "TMP_PREFIX"]

#: Every temporary file starts with this prefix, so a folder can be swept of the ones a
#: killed writer left behind.
TMP_PREFIX = ".tmp-"


def atomic_write(path, writer, *, binary: bool = True):
    """Write ``path`` atomically; ``writer(f)`` writes the content to the open file ``f``.

    ``f`` is a binary file object when ``binary`` (the default), else a UTF-8 text file.
    Returns ``path`` as a string. The folder must already exist.
    """
    if not callable(writer):
        raise TypeError(f"atomic_write: writer must be callable, got {type(writer).__name__}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    mode = 0o666  # os.open applies the umask itself (reading it would mean setting it process-wide)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f"{TMP_PREFIX}{base}.{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, flags, mode)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"atomic_write: could not create a temporary file in {folder}")
    try:
        if binary:
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding="utf-8", newline="")
        with f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)
    return path


def _fsync_folder(folder):
    # Make the rename itself durable where the platform allows opening a folder.
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
