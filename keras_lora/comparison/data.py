"""Text sources and token windows for the comparison (all offline).

Every source returns a list of documents (strings):

- `broad_documents()`: what the shipped base model (`shipped.py`) was
  pre-trained on: the English documentation that ships with every Python,
  `pydoc_data.topics` (about 465 KB), and the standard library's own
  library code (its top-level modules and packages, about 6.9 MB) except
  the `FINETUNE_PACKAGES`.
- `pretraining_documents()`: what the small from-scratch base model
  (`--base scratch`) learns from: `pydoc_data.topics`, optionally plus
  some of the same standard-library code.
- `function_documents()`: the default fine-tuning corpus (`corpus=
  "functions"`): a task over code the shipped base has read. Each
  document is a request line, ``### Source of `json.dumps` ``, followed by
  that function's source, for short functions and methods of the
  standard library's modules the base was pre-trained on. The base knows
  the code but has never seen the request format; the fine-tune teaches
  it to answer a request with the function asked for.
- `finetune_package_documents()`: the other built-in corpus (`corpus=
  "unseen-packages"`), the `FINETUNE_PACKAGES` as plain code: new code
  neither base model has read, i.e. new knowledge rather than a new task.
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

# The built-in fine-tuning corpora (`ComparisonConfig.corpus`): a request
# format over functions the base has read, or code it never read.
CORPORA = ("functions", "unseen-packages")
# The request line of a `function_documents()` document.
FUNCTION_REQUEST = "### Source of `{name}`\n"
# Functions and methods of this many characters (source, decorators
# excluded) make `function_documents()`: short enough that a 128-token
# window holds a request or two, long enough to have a body.
FUNCTION_CHARACTERS = (100, 1200)

# The standard-library packages no base model is pre-trained on: the
# `"unseen-packages"` fine-tuning corpus. One domain, internet formats and
# protocols (e-mail, HTML, HTTP, URLs, WSGI, XML-RPC), about 1 MB of code.
FINETUNE_PACKAGES = ("email", "html", "http", "urllib", "wsgiref", "xmlrpc")

# Standard-library folders that are not library code (tests, tools, demos,
# data, vendored or platform folders): never read as training text.
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


def topics_documents(max_bytes=None):
    """The topics of `pydoc_data.topics`, sorted by name (about 465 KB)."""
    from pydoc_data import topics

    parts = [topics.topics[name] for name in sorted(topics.topics)]
    return _limit(parts, max_bytes)


def pretraining_documents(max_bytes=None, code_bytes=0):
    """The from-scratch base model's text: topics, then some library code.

    `max_bytes` limits the topics (`None`: all of them); `code_bytes` adds
    that many bytes of the standard library's code, shuffled by file and
    never from the `FINETUNE_PACKAGES`.
    """
    parts = topics_documents(max_bytes)
    if code_bytes:
        parts += _read_files(
            _shuffled(stdlib_code_files()), code_bytes, "the standard library"
        )
    return parts


def broad_documents(max_bytes=None):
    """The shipped base model's text: topics, then the library code.

    Every `.py` file of `stdlib_code_files()` (all but the
    `FINETUNE_PACKAGES`), shuffled by file with a fixed seed; `max_bytes`
    limits the whole (`None`: all of it, about 7.3 MB).
    """
    code = _read_files(
        _shuffled(stdlib_code_files()), max_bytes, "the standard library"
    )
    return _limit(topics_documents() + code, max_bytes)


def finetune_package_documents(max_bytes=1_000_000, seed=0):
    """The `FINETUNE_PACKAGES`' `.py` files, shuffled by file (`seed`).

    Shuffled so that the held-out end of the token stream (see
    `split_windows`) comes from several of the packages, not only the last
    one by name.
    """
    files = stdlib_code_files(packages=FINETUNE_PACKAGES, modules=False)
    return _read_files(
        _shuffled(files, seed), max_bytes, "the standard library's packages"
    )


def function_documents(max_bytes=1_000_000, seed=0):
    """Requests for functions the shipped base read, each with its source.

    Every document is `FUNCTION_REQUEST` naming a function or method by
    its dotted path (`module.Class.method`), then its source as it stands
    in the file (whole lines from `def`, so methods keep their
    indentation; decorators left out), for those whose source has
    `FUNCTION_CHARACTERS` characters. The modules are those of
    `stdlib_code_files()` (what `broad_documents()` pre-trains on),
    visited in a shuffled order (`seed`) until `max_bytes` are collected;
    the documents are then shuffled too, so training and held-out
    windows (the end of the stream) hold different functions of the same
    modules.
    """
    import ast

    root = stdlib_directory()
    low, high = FUNCTION_CHARACTERS
    documents, size = [], 0
    for path in _shuffled(stdlib_code_files(), seed):
        if max_bytes is not None and size >= max_bytes:
            break
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            tree = ast.parse(text)
        except (UnicodeDecodeError, OSError, SyntaxError, ValueError):
            continue
        module = _module_name(os.path.relpath(path, root))
        lines = text.splitlines(keepends=True)
        for name, node in _functions(tree, module):
            # Whole lines from `def` to the end (decorators left out).
            source = "".join(lines[node.lineno - 1 : node.end_lineno])
            source = source.rstrip()
            if low <= len(source) <= high:
                document = FUNCTION_REQUEST.format(name=name) + source + "\n"
                documents.append(document)
                size += len(document.encode("utf-8"))
    if not documents:
        raise ValueError(
            "No function could be read from the standard library at "
            f"'{root}'. Pass --data FILE_OR_DIR or --corpus unseen-packages."
        )
    random.Random(seed).shuffle(documents)
    return _limit(documents, max_bytes)


def _module_name(relative_path):
    """`json/decoder.py` -> `json.decoder`; `json/__init__.py` -> `json`."""
    name = relative_path[: -len(".py")].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _functions(tree, prefix):
    """`(dotted name, node)` of the functions and methods under `tree`
    (classes nested in classes included, functions inside functions not)."""
    import ast

    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}.{node.name}", node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}.{node.name}")


def stdlib_directory():
    return sysconfig.get_paths()["stdlib"]


def stdlib_code_files(packages=None, modules=True):
    """Paths of the standard library's own library code, sorted.

    Args:
        packages: the package folders to read (`None`: every package but
            the `FINETUNE_PACKAGES`); tests, tools, demos and data folders
            (`_NOT_PACKAGES`) are never read.
        modules: also the top-level modules (`argparse.py`, ...).
    """
    directory = stdlib_directory()
    files = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            if modules and name.endswith(".py"):
                files.append(path)
            continue
        if not os.path.isdir(path) or _skipped_folder(name):
            continue
        wanted = (
            name not in FINETUNE_PACKAGES
            if packages is None
            else name in packages
        )
        if not wanted:
            continue
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not _skipped_folder(d))
            files += [
                os.path.join(root, n)
                for n in sorted(names)
                if n.endswith(".py")
            ]
    return files


def _skipped_folder(name):
    return name in _NOT_PACKAGES or name.startswith(("config-", "."))


def _shuffled(files, seed=0):
    files = list(files)
    random.Random(seed).shuffle(files)
    return files


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
            "on the Python standard library's internet packages."
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


def finetuning_documents(data=None, max_bytes=1_000_000, corpus=None):
    """The fine-tuning corpus: the user's `data`, else the built-in
    `corpus` (`"functions"`, the default: `function_documents`;
    `"unseen-packages"`: `finetune_package_documents`)."""
    if data is not None:
        return user_documents(data, max_bytes)
    corpus = CORPORA[0] if corpus is None else corpus
    if corpus == "functions":
        return function_documents(max_bytes)
    if corpus == "unseen-packages":
        return finetune_package_documents(max_bytes)
    raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}.")


def corpus_description(data=None, corpus=None):
    """One line saying what `finetuning_documents` reads."""
    if data is not None:
        return data
    corpus = CORPORA[0] if corpus is None else corpus
    if corpus == "functions":
        request = FUNCTION_REQUEST.format(name="json.dumps").strip()
        return (
            "requests for functions of the standard-library modules the "
            f"base read ({request} + the function's source)"
        )
    return (
        "standard-library packages the base never read: "
        + ", ".join(FINETUNE_PACKAGES)
        + f" ({stdlib_directory()})"
    )


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
