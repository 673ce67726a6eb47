"""Atomic writes: a directory or a file replaced whole, or not at all.

`atomic_write_dir` (adapter directories) and `atomic_write_file` (`.keras`
files) write into temporaries beside the target, fsync them and rename
them into place, so an interrupted save leaves the previous version
intact. `leftovers` finds what an interrupted save left beside a target.

Concurrency (POSIX advisory locks on the directories themselves, so no
lock files are left behind; elsewhere writes are atomic but not
coordinated):

- Writers are serialised by an exclusive lock on the parent directory,
  held for the whole save. A writer first removes what interrupted saves
  left (temporaries; a backup is renamed back if the target is missing).
- Replacing a directory takes two renames (old -> backup, new -> target).
  The writer makes them while holding an exclusive lock on the old
  directory; `reading(directory)` holds a shared lock on the directory
  while a reader reads its files (and checks it locked the directory that
  is at the path), and waits out the instant between the renames. So a
  reader never sees a missing directory or files from two saves.
"""

import contextlib
import os
import shutil
import tempfile
import time
import uuid

try:  # POSIX advisory locks; absent on Windows.
    import fcntl
except ImportError:  # pragma: no cover - not on Linux CI
    fcntl = None

_TMP_TAG = ".keras_lora-tmp-"
OLD_TAG = ".keras_lora-old-"
# A reader that finds the directory gone while a save swaps it in retries
# this often, this far apart (2 s in all; a swap takes microseconds).
_READ_ATTEMPTS = 200
_READ_PAUSE = 0.01


def atomic_write_dir(directory, write, keep=()):
    """Writes `directory` atomically: `write(tmp)` fills a fresh directory.

    The new directory is made beside `directory` (same parent, so renames
    stay on one file system), fsynced, then swapped in: the old directory is
    renamed to a backup name, the new one renamed into place, the backup
    deleted. If anything fails, the old directory is put back and the
    temporary one removed. Entries of the old directory that `write` does
    not produce (other than the names in `keep`) are carried over.
    Concurrent writers of the same directory wait for each other.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent, base = os.path.split(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"'{directory}' exists and is not a directory; pass a directory "
            "path to save the adapter in."
        )
    os.makedirs(parent, exist_ok=True)
    with _locked(parent, exclusive=True):
        _clean_leftovers(directory)
        tmp = tempfile.mkdtemp(prefix=f".{base}{_TMP_TAG}", dir=parent)
        try:
            write(tmp)
            # mkdtemp makes the directory 0700 and some writers (the
            # safetensors library) make files 0600.
            for root, _, files in os.walk(tmp):
                _default_mode(root, 0o777)
                for name in files:
                    _default_mode(os.path.join(root, name), 0o666)
            if os.path.isdir(directory):
                _carry_over(directory, tmp, skip=set(keep))
            _fsync_dir(tmp)
            backup = None
            if os.path.isdir(directory):
                backup = os.path.join(
                    parent, f".{base}{OLD_TAG}{uuid.uuid4().hex}"
                )
                # Readers of the old directory finish first.
                with _locked(directory, exclusive=True):
                    os.replace(directory, backup)
                    try:
                        os.replace(tmp, directory)
                    except BaseException:
                        os.replace(backup, directory)
                        raise
            else:
                os.replace(tmp, directory)
            tmp = None
            _fsync_dir(parent)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def reading(directory):
    """Context manager for readers of a directory `atomic_write_dir` writes.

    Holds a shared lock on the directory at `directory` while the reader
    reads, so a concurrent save swaps it before or after the read, never
    during it; waits (briefly, boundedly) if the path is empty because a
    save is between its two renames. If the directory does not exist, the
    body runs without a lock (and finds it missing).
    """
    directory = os.path.abspath(os.fspath(directory))
    fd = None
    for _ in range(_READ_ATTEMPTS if fcntl is not None else 0):
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            if not leftovers(directory, OLD_TAG):
                break  # no save in progress: really missing
            time.sleep(_READ_PAUSE)
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = _same_file(os.stat(directory), os.fstat(fd))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # swapped while we waited: lock the new one
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def _default_mode(path, mode):
    """Gives `path` the permissions a plain `open`/`mkdir` would: `mode`
    less the process's umask (temporaries are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _same_file(a, b):
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def atomic_write_file(path, write, suffix=""):
    """Writes file `path` atomically: `write(tmp, scratch)` fills a temp file.

    `tmp` is a fresh, empty file beside `path` (same parent, so the rename
    stays on one file system); `scratch()` makes another one there, for
    intermediate files. `tmp` is then fsynced and renamed into place and
    the parent fsynced. All temporaries left are removed, also on failure,
    so an interrupted write leaves a previous `path` intact. A single
    rename replaces the file, so readers see the old file or the new one.
    """
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    temps = []

    def scratch():
        fd, temp = tempfile.mkstemp(
            prefix=f".{base}{_TMP_TAG}", suffix=suffix, dir=parent
        )
        os.close(fd)
        temps.append(temp)
        return temp

    try:
        tmp = scratch()
        _default_mode(tmp, 0o666)  # mkstemp makes it 0600
        write(tmp, scratch)
        fsync_file(tmp)
        os.replace(tmp, path)
        temps.remove(tmp)
        _fsync_dir(parent)
    finally:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)
    return path


@contextlib.contextmanager
def _locked(path, exclusive):
    """An advisory lock on directory `path` (POSIX; a no-op elsewhere)."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _clean_leftovers(directory):
    """Removes what interrupted saves left beside `directory`.

    Called with the writer lock held, so no other save is in progress: any
    temporary is stale. A backup is the previous adapter of a save killed
    between its two renames: it is put back if `directory` is missing,
    deleted otherwise.
    """
    for temp in leftovers(directory, _TMP_TAG):
        _remove(temp)
    backups = leftovers(directory, OLD_TAG)
    if backups and not os.path.exists(directory):
        newest = max(backups, key=os.path.getmtime)
        os.replace(newest, directory)
        backups.remove(newest)
    for backup in backups:
        _remove(backup)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _carry_over(old, new, skip):
    for entry in os.listdir(old):
        if entry in skip or os.path.lexists(os.path.join(new, entry)):
            continue
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link)
        else:
            _link(src, dst)


def _link(src, dst):
    # A hard link is instant and shares the data; copy where links fail.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def leftovers(directory, tag):
    parent, base = os.path.split(os.path.abspath(directory))
    if not os.path.isdir(parent):
        return []
    prefix = f".{base}{tag}"
    return sorted(
        os.path.join(parent, e)
        for e in os.listdir(parent)
        if e.startswith(prefix)
    )
