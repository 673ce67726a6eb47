"""Atomic writes: a directory or a file replaced whole, or not at all.

`atomic_write_dir` (adapter directories) and `atomic_write_file` (`.keras`
files) write into temporaries beside the target, fsync them and rename
them into place, so an interrupted save leaves the previous version
intact. `leftovers` finds what an interrupted save left beside a target.
"""

import os
import shutil
import tempfile
import uuid

_TMP_TAG = ".keras_lora-tmp-"
OLD_TAG = ".keras_lora-old-"


def atomic_write_dir(directory, write, keep=()):
    """Writes `directory` atomically: `write(tmp)` fills a fresh directory.

    The new directory is made beside `directory` (same parent, so renames
    stay on one file system), fsynced, then swapped in: the old directory is
    renamed to a backup name, the new one renamed into place, the backup
    deleted. If anything fails, the old directory is put back and the
    temporary one removed. Entries of the old directory that `write` does
    not produce (other than the names in `keep`) are carried over.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent, base = os.path.split(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"'{directory}' exists and is not a directory; pass a directory "
            "path to save the adapter in."
        )
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}{_TMP_TAG}", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(directory):
            _carry_over(directory, tmp, skip=set(keep))
        _fsync_dir(tmp)
        if os.path.isdir(directory):
            backup = os.path.join(parent, f".{base}{OLD_TAG}{uuid.uuid4().hex}")
            os.replace(directory, backup)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(backup, directory)
                raise
            tmp = None
            _fsync_dir(parent)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, directory)
            tmp = None
            _fsync_dir(parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_file(path, write, suffix=""):
    """Writes file `path` atomically: `write(tmp, scratch)` fills a temp file.

    `tmp` is a fresh, empty file beside `path` (same parent, so the rename
    stays on one file system); `scratch()` makes another one there, for
    intermediate files. `tmp` is then fsynced and renamed into place and
    the parent fsynced. All temporaries left are removed, also on failure,
    so an interrupted write leaves a previous `path` intact.
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
