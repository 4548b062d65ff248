"""`olmax_stdlib`: the embedded default corpus, Python's own standard library.

Every machine that runs Olmax has it, so the quickstart, the tests and the
benchmarks train offline with nothing to download.

* Files: the `*.py` files under `sysconfig.get_paths()['stdlib']`, without
  site-packages / dist-packages (third-party code), `__pycache__` and the test
  suites (see `files.STDLIB_EXCLUDED_DIRS`). About 700-2000 files and 10-30 MB,
  depending on the Python build.
* Split: a file is in 'validation' iff the SHA-256 of its relative POSIX path
  (e.g. 'json/decoder.py') falls in the first 2% (`files.is_validation_key`), so
  the split is the same on every machine and run, independent of listing order
  and PYTHONHASHSEED, and train / validation never share a file. (The corpus
  itself differs between Python versions.)
* Documents: one per file; the few files over 256 KiB are cut at line
  boundaries. Vocabulary: bytes (`BYTE_VOCAB_SIZE` = 384 embedding rows).
* Nothing is listed or read at import: the listing (a few ms) happens when a
  dataset is first built, and is then cached.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

from . import files as files_lib
from . import registry
from . import sources
from . import vocab as vocab_lib

STDLIB_TASK = "olmax_stdlib"


@functools.lru_cache(maxsize=None)
def stdlib_split_files(
    split: str,
    fraction: float = files_lib.VALIDATION_FRACTION,
    root: Optional[str] = None,
) -> Tuple[str, ...]:
    """Absolute paths of the stdlib files of `split`, sorted by relative path."""
    root = root or files_lib.stdlib_root()
    relative = files_lib.list_stdlib_files(root)
    if not relative:
        raise FileNotFoundError(
            f"No standard-library *.py files found under {root!r}; this Python "
            "build ships its standard library in another form. Use the text_files "
            "task instead (OLMAX_TEXT_FILES='data/*.txt')."
        )
    chosen = files_lib.split_files_by_path(relative, split, fraction)
    return tuple(os.path.join(root, *p.split("/")) for p in chosen)


def register_stdlib_task(
    name: str = STDLIB_TASK,
    vocabulary: vocab_lib.VocabularySpec = "byte",
    validation_fraction: float = files_lib.VALIDATION_FRACTION,
    max_document_bytes: Optional[int] = sources.DEFAULT_MAX_DOCUMENT_BYTES,
):
    """Registers (or re-registers) the stdlib corpus task under `name`."""

    def files_fn(split: str) -> sources.SplitFiles:
        return sources.SplitFiles(
            files=stdlib_split_files(split, validation_fraction),
            document_mode="file",
            max_document_bytes=max_document_bytes,
        )

    source = sources.TextFileSource(
        files_fn, description=f"{name}: Python standard library"
    )
    return registry.add_lm_task(name, source, vocab_lib.task_vocabulary(vocabulary))


register_stdlib_task()
