"""Text sources and token windows for the comparison (all offline).

Every source returns a list of documents (strings):

- `pretraining_documents()`: what the small base model learns from: the
  English documentation that ships with every Python, `pydoc_data.topics`
  (about 465 KB), optionally plus code from the standard library's
  *packages* (`asyncio/`, `email/`, ...; `stdlib_package_documents`).
- `stdlib_documents()`: the standard library's own top-level `.py`
  modules (`argparse.py`, `ast.py`, ...), the default fine-tuning corpus:
  code, where the base model read mostly prose. No file is in both.
- `user_documents(path)`: a text file or a directory of text files.
- `windows(...)`, `split_windows(...)`: token streams cut into training
  examples of `sequence_length + 1` tokens (inputs and shifted labels).
"""

import os
import random
import sysconfig

import numpy as np

# Extensions read from a user directory (other files are skipped).
TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".tex")


# Standard-library folders that are not library code (tests, tools, demos,
# data, vendored or platform folders): never read as pre-training text.
_NOT_PACKAGES = (
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "pydoc_data",
    "encodings",
    "distutils",
    "__pycache__",
)


def pretraining_documents(max_bytes=None, code_bytes=0):
    """The topics of `pydoc_data.topics`, then `code_bytes` of package code.

    `max_bytes` limits the topics (`None`: all of them, about 465 KB);
    `code_bytes` adds that many bytes of `stdlib_package_documents`.
    """
    from pydoc_data import topics

    parts = [topics.topics[name] for name in sorted(topics.topics)]
    parts = _limit(parts, max_bytes)
    if code_bytes:
        parts += stdlib_package_documents(code_bytes)
    return parts


def stdlib_directory():
    return sysconfig.get_paths()["stdlib"]


def stdlib_package_documents(max_bytes, seed=0):
    """`.py` files of the standard library's packages (its folders).

    Only folders of library code (not tests, tools or demos, see
    `_NOT_PACKAGES`), and never the top-level modules that
    `stdlib_documents` fine-tunes on. The files are shuffled with `seed`
    before `max_bytes` is read, so the text spans many packages.
    """
    directory = stdlib_directory()
    files = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path) or _skipped_folder(name):
            continue
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not _skipped_folder(d))
            files += [
                os.path.join(root, n)
                for n in sorted(names)
                if n.endswith(".py")
            ]
    random.Random(seed).shuffle(files)
    return _read_files(files, max_bytes, what="the standard library's packages")


def _skipped_folder(name):
    return name in _NOT_PACKAGES or name.startswith(("config-", "."))


def stdlib_documents(max_bytes=1_000_000):
    """The standard library's top-level `.py` sources, sorted by name.

    Files are concatenated until `max_bytes` is reached. The standard
    library lives in every Python installation, so this needs no download.
    """
    directory = stdlib_directory()
    files = sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.endswith(".py") and not name.startswith("_")
    )
    return _read_files(files, max_bytes, what="the standard library")


def user_documents(path, max_bytes=1_000_000):
    """Text from a file, or from the text files under a directory.

    Args:
        path: a text file, or a directory searched recursively for files
            ending in one of `TEXT_EXTENSIONS` (read in sorted order).
        max_bytes: stop after this many bytes.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: no text could be read from `path`.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--data: '{path}' does not exist. Pass an existing text file "
            "or a directory of text files, or leave --data out to fine-tune "
            "on the Python standard library's source code."
        )
    if os.path.isfile(path):
        files = [path]
    else:
        files = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            files += [
                os.path.join(root, n)
                for n in sorted(names)
                if n.lower().endswith(TEXT_EXTENSIONS)
            ]
        if not files:
            raise ValueError(
                f"--data: directory '{path}' holds no text files (looked "
                f"for {', '.join(TEXT_EXTENSIONS)}). Pass a directory with "
                "such files, or a single text file."
            )
    return _read_files(files, max_bytes, what=f"'{path}'")


def finetuning_documents(data=None, max_bytes=1_000_000):
    """The fine-tuning corpus: the user's `data`, else stdlib sources."""
    if data is None:
        return stdlib_documents(max_bytes)
    return user_documents(data, max_bytes)


def _read_files(files, max_bytes, what):
    parts, size = [], 0
    for name in files:
        if max_bytes is not None and size >= max_bytes:
            break
        try:
            with open(name, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: not text, skip it
        parts.append(text)
        size += len(text.encode("utf-8"))
    parts = [p for p in _limit(parts, max_bytes) if p.strip()]
    if not parts:
        raise ValueError(
            f"--data: no UTF-8 text could be read from {what}. Pass a "
            "UTF-8 text file or a directory of them."
        )
    return parts


def _limit(documents, max_bytes):
    """The documents, the last one cut so the total is <= `max_bytes`."""
    if max_bytes is None:
        return list(documents)
    out, size = [], 0
    for doc in documents:
        data = doc.encode("utf-8")
        if size + len(data) > max_bytes:
            cut = data[: max_bytes - size].decode("utf-8", errors="ignore")
            if cut:
                out.append(cut)
            break
        out.append(doc)
        size += len(data)
    return out


def windows(token_ids, sequence_length):
    """Non-overlapping windows of `sequence_length + 1` tokens.

    Returns an int32 array `(num_windows, sequence_length + 1)`: column
    `0..L-1` is a model input, column `1..L` its next-token labels.
    """
    token_ids = np.asarray(token_ids, dtype="int32")
    width = sequence_length + 1
    count = len(token_ids) // width
    return token_ids[: count * width].reshape(count, width)


def split_windows(all_windows, validation_fraction, max_validation_windows):
    """`(train, validation)`: the last windows of the stream are held out.

    Holding out the end of the stream (not random windows) keeps the
    validation text apart from the training text.
    """
    count = len(all_windows)
    n_val = max(1, int(round(count * validation_fraction)))
    if count - n_val < 1:
        raise ValueError(
            f"The text gives only {count} windows; need at least 2 (one to "
            "train, one to validate). Pass more text, or lower "
            "--sequence-length."
        )
    train, val = all_windows[: count - n_val], all_windows[count - n_val :]
    return train, val[:max_validation_windows]


def training_windows(train, steps, batch_size, seed):
    """Exactly `steps * batch_size` shuffled windows (repeating if short)."""
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    order = []
    while len(order) < needed:
        order.extend(rng.permutation(len(train)).tolist())
    return train[np.asarray(order[:needed])]


def as_inputs(batch_windows):
    """`(x, y)` for a GPT-2 causal LM from `(n, L + 1)` windows."""
    x = {
        "token_ids": batch_windows[:, :-1],
        "padding_mask": np.ones_like(batch_windows[:, :-1]),
    }
    return x, batch_windows[:, 1:]
