"""Matching layer paths against the patterns configs and files use.

A pattern is a layer name, a `/`-suffix of a path, or a regular expression
matched against the whole path. `target_modules`, `exclude_modules`,
`modules_to_save`, `rank_pattern` and `alpha_pattern` all go through here.
"""

import re


def path_matches(pattern, path):
    """True if `pattern` is `path`, a `/`-suffix of it, or a regex on it."""
    if path == pattern or path.endswith("/" + pattern):
        return True
    try:
        return re.fullmatch(pattern, path) is not None
    except re.error:
        return False


def matches(patterns, path):
    """True if `path` matches `patterns`.

    A string is one regular expression on the whole path (PEFT's
    convention for `target_modules`); a list holds names, path suffixes or
    regexes, any of which may match.
    """
    if isinstance(patterns, str):
        try:
            return re.fullmatch(patterns, path) is not None
        except re.error:
            return False
    return any(path_matches(p, path) for p in patterns)


def lookup(mapping, path, default):
    """The value of the first pattern in `mapping` that matches `path`."""
    for pattern, value in mapping.items():
        if path_matches(pattern, path):
            return value
    return default


def anchored(path):
    """A pattern that matches exactly `path`, nothing else."""
    return "^" + re.escape(path) + "$"
