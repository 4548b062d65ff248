"""Finding text files and splitting them into train / validation, in plain Python.

This module imports nothing heavier than the standard library (TensorFlow only
lazily, for `gs://`-style patterns), so it is cheap to import and its results can
be checked from a bare interpreter.

Determinism. Every split decision here is a function of a file's *relative path*
only, hashed with SHA-256: it does not depend on file-system listing order, on
the machine, on the process or on `PYTHONHASHSEED` (Python's built-in `hash()` of
a string changes with that seed, so it is never used). Lists are returned sorted.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from typing import Iterable, List, Optional, Sequence, Union

#: Default share of documents (or files) that goes to the 'validation' split.
VALIDATION_FRACTION = 0.02

Patterns = Union[None, str, Sequence[str]]


def stable_fraction(key: str) -> float:
    """Maps `key` to a number in [0, 1), identically on every machine and run."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_validation_key(key: str, fraction: float = VALIDATION_FRACTION) -> bool:
    """True when `key` (e.g. a relative file path) belongs to 'validation'."""
    return stable_fraction(key) < fraction


def split_patterns(patterns: Patterns) -> List[str]:
    """Normalizes file patterns to a list of non-empty strings.

    Accepts None (no patterns), one string, or a sequence of strings. Every string
    is also split on commas, so `'a/*.txt,b/*.txt'` (the form an environment
    variable or a quick flag gives) and `['a/*.txt', 'b/*.txt']` are the same.
    """
    if patterns is None:
        return []
    if isinstance(patterns, (str, bytes, os.PathLike)):
        patterns = [patterns]
    out = []
    for pattern in patterns:
        pattern = os.fsdecode(pattern)
        out.extend(p.strip() for p in pattern.split(",") if p.strip())
    return out


def _is_remote(pattern: str) -> bool:
    return "://" in pattern


def _glob_one(pattern: str) -> List[str]:
    """Files (not directories) matching one pattern; `**` recurses locally."""
    if _is_remote(pattern):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        return [f for f in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(f)]
    local = os.path.expanduser(pattern)
    return [
        os.path.abspath(f)
        for f in glob.glob(local, recursive=True)
        if os.path.isfile(f)
    ]


def expand_patterns(patterns: Patterns, what: str, hint: str = "") -> List[str]:
    """Sorted, de-duplicated files matching all `patterns`.

    Args:
      patterns: see `split_patterns`. Relative local patterns are relative to the
        current working directory at the time of the call.
      what: how to name these patterns in an error, e.g. "text_files train
        pattern".
      hint: appended to the error: how the user sets the patterns.

    Raises:
      ValueError: when there are no patterns at all.
      FileNotFoundError: when any pattern matches no file. All such patterns are
        named; a pattern that is a directory gets a suggestion to add `/*.txt`.
    """
    pattern_list = split_patterns(patterns)
    suffix = f"; {hint}" if hint else ""
    if not pattern_list:
        raise ValueError(f"No file patterns given ({what}){suffix}")
    files = set()
    empty = []
    for pattern in pattern_list:
        matched = _glob_one(pattern)
        if not matched:
            empty.append(pattern)
        files.update(matched)
    if empty:
        notes = []
        for pattern in empty:
            local = os.path.expanduser(pattern)
            if not _is_remote(pattern) and os.path.isdir(local):
                notes.append(
                    f"{pattern!r} is a directory: use a file pattern such as "
                    f"{os.path.join(pattern, '*.txt')!r} or "
                    f"{os.path.join(pattern, '**', '*.txt')!r}"
                )
        relative = any(
            not _is_remote(p) and not os.path.isabs(os.path.expanduser(p)) for p in empty
        )
        cwd = f" (relative to the working directory {os.getcwd()!r})" if relative else ""
        names = ", ".join(repr(p) for p in empty)
        plural = "pattern" if len(empty) == 1 else "patterns"
        message = f"No files match {names} ({what} {plural}){cwd}; check the path"
        if notes:
            message += "; " + "; ".join(notes)
        raise FileNotFoundError(message + suffix)
    return sorted(files)


def _size(path: str) -> int:
    if _is_remote(path):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        return tf.io.gfile.stat(path).length
    return os.path.getsize(path)


def check_some_text(files: Sequence[str], what: str, hint: str = "") -> None:
    """Raises ValueError when every one of `files` is empty: the split they make holds no
    document, and without this the first message would blame a split, not the files.
    Stops at the first non-empty file, so a large corpus costs one stat."""
    if any(_size(f) > 0 for f in files):
        return
    shown = ", ".join(repr(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    every = "The only file" if len(files) == 1 else f"Every one of the {len(files)} files"
    suffix = f"; {hint}" if hint else ""
    raise ValueError(f"{every} of {what} ({shown}) is empty: there is no text to train on; add text or point the "
                     f"patterns at other files{suffix}")


# ------------------------------------------------------------------ stdlib corpus

#: Directories never read for the `olmax_stdlib` corpus: installed third-party
#: packages (not the standard library, and they differ between machines), byte
#: code caches, and the test suites (large, full of deliberately odd data).
STDLIB_EXCLUDED_DIRS = frozenset({
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
})


def stdlib_root() -> str:
    """The directory of this interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def list_stdlib_files(root: Optional[str] = None) -> List[str]:
    """Sorted relative POSIX paths of the standard library's `*.py` files."""
    root = root or stdlib_root()
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS]
        rel_dir = os.path.relpath(directory, root)
        for name in names:
            if name.endswith(".py"):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def split_files_by_path(
    relative_paths: Iterable[str],
    split: str,
    fraction: float = VALIDATION_FRACTION,
) -> List[str]:
    """The paths of `split` ('train' or 'validation'), decided by path hash."""
    if split not in ("train", "validation"):
        raise ValueError(f"Unknown split {split!r}; expected 'train' or 'validation'")
    want_validation = split == "validation"
    return sorted(
        p for p in relative_paths if is_validation_key(p, fraction) == want_validation
    )
