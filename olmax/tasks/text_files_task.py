"""Zero-code training on local text files.

The task `text_files` is registered at import and reads its settings only when
a dataset is built (or its vocabulary first used), from the Gin configurable
`olmax_tasks.text_files`, falling back to environment variables:

    setting              Gin binding (olmax_tasks.text_files.*)   environment
    train files          train_patterns = ['data/*.txt']          OLMAX_TEXT_FILES='a/*.txt,b/*.md'
    validation files     validation_patterns = ['val/*.txt']      OLMAX_TEXT_FILES_VALIDATION
    vocabulary           vocabulary = 'byte' | '/path/spm.model'  OLMAX_TEXT_FILES_VOCAB
    document_mode        'file' | 'paragraph' | 'line'            -
    validation_fraction  0.02                                     -
    max_document_bytes   262144                                   -

From the command line (T5X-style `--gin.KEY=VALUE` flags; the module must be
imported before Gin parses, which the Olmax binaries do):

    python -m olmax.train --gin_file=gin/quickstart.gin \\
        --gin.MIXTURE_OR_TASK_NAME="'text_files'" \\
        --gin.olmax_tasks.text_files.train_patterns="['data/*.txt']"

The Olmax binaries also accept the value unquoted (`...train_patterns=data/*.txt`).
The same bindings work in Gin files, with or without `dynamic_registration`
(`import olmax_tasks` first): the package attribute `olmax_tasks.text_files` is
this configurable. With no Gin at all, use the environment:

    OLMAX_TEXT_FILES='data/*.txt' python -m olmax.train ... \\
        --gin.MIXTURE_OR_TASK_NAME="'text_files'"

A pattern string may hold several patterns separated by commas; `**` matches
directories recursively; relative paths are relative to the working directory.

Why settings are read late: the trainer parses Gin (and may finalize it) and
only then calls `seqio.get_mixture_or_task('text_files').get_dataset(...)`. A
task whose files were fixed at import could not see those bindings; this one
calls the configurable at build time, when Gin's bindings apply.

Documents: one per file by default (long files cut at line boundaries every
~256 KiB); `document_mode='paragraph'` makes one per blank-line-separated block
and 'line' one per line (see `sources`). Without validation patterns, ~2% of the
documents go to 'validation' by a hash of their text (deterministic, works for
one file as well as for thousands; identical documents share a split). With very
little text, 'validation' can come out empty: give validation patterns then.

Missing files raise `FileNotFoundError` when the dataset is built, naming every
pattern that matched nothing and how to set the patterns.

Other tasks of this kind, under their own names and with fixed patterns, come
from `register_text_files_task(...)` in a user's task module.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Tuple

import gin
import seqio

from . import files as files_lib
from . import registry
from . import sources
from . import vocab as vocab_lib

TEXT_FILES_TASK = "text_files"
TRAIN_FILES_ENV = "OLMAX_TEXT_FILES"
VALIDATION_FILES_ENV = "OLMAX_TEXT_FILES_VALIDATION"
VOCAB_ENV = "OLMAX_TEXT_FILES_VOCAB"

_DEFAULT_TASK_HINT = (
    "set the files with --gin.olmax_tasks.text_files.train_patterns=\"['data/*.txt']\" "
    f"(validation: ...validation_patterns) or the environment variable "
    f"{TRAIN_FILES_ENV}='data/*.txt' ({VALIDATION_FILES_ENV} for validation)"
)


@dataclasses.dataclass(frozen=True)
class TextFilesConfig:
    """Settings of one text-files task (patterns are not yet expanded)."""

    train_patterns: Tuple[str, ...]
    validation_patterns: Tuple[str, ...] = ()
    vocabulary: vocab_lib.VocabularySpec = "byte"
    validation_fraction: float = files_lib.VALIDATION_FRACTION
    document_mode: str = "file"
    max_document_bytes: Optional[int] = sources.DEFAULT_MAX_DOCUMENT_BYTES
    from_environment: Tuple[str, ...] = ()  # the environment variables the patterns came from

    @classmethod
    def from_patterns(cls, train_patterns, validation_patterns, vocabulary, validation_fraction, document_mode,
                      max_document_bytes, from_environment: Tuple[str, ...] = ()) -> "TextFilesConfig":
        """From user input: pattern strings (commas separate several) or lists."""
        return cls(
            train_patterns=tuple(files_lib.split_patterns(train_patterns)),
            validation_patterns=tuple(files_lib.split_patterns(validation_patterns)),
            vocabulary=vocabulary,
            validation_fraction=float(validation_fraction),
            document_mode=document_mode,
            max_document_bytes=max_document_bytes,
            from_environment=from_environment,
        )

    def __post_init__(self):
        sources.check_document_mode(self.document_mode)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )


@gin.configurable("text_files", module="olmax_tasks")
def text_files_config(
    train_patterns=None,
    validation_patterns=None,
    vocabulary=None,
    validation_fraction: float = files_lib.VALIDATION_FRACTION,
    document_mode: str = "file",
    max_document_bytes: Optional[int] = sources.DEFAULT_MAX_DOCUMENT_BYTES,
) -> TextFilesConfig:
    """The settings of the `text_files` task: Gin bindings, else environment.

    Gin name `olmax_tasks.text_files`; see the module docstring for the table.
    """
    env, from_environment = os.environ, []
    if train_patterns is None and env.get(TRAIN_FILES_ENV):
        train_patterns = env[TRAIN_FILES_ENV]
        from_environment.append(TRAIN_FILES_ENV)
    if validation_patterns is None and env.get(VALIDATION_FILES_ENV):
        validation_patterns = env[VALIDATION_FILES_ENV]
        from_environment.append(VALIDATION_FILES_ENV)
    if vocabulary is None:
        vocabulary = env.get(VOCAB_ENV) or "byte"
    return TextFilesConfig.from_patterns(train_patterns, validation_patterns, vocabulary, validation_fraction,
                                         document_mode, max_document_bytes, tuple(from_environment))


def _hint(config: TextFilesConfig, variable: str, patterns: Tuple[str, ...], hint: str) -> str:
    """`hint`, preceded by where the patterns came from when that was the environment: a user
    who forgot an exported OLMAX_TEXT_FILES would otherwise look for them in the gin files."""
    if variable not in config.from_environment:
        return hint
    return (f"the {'pattern comes' if len(patterns) == 1 else 'patterns come'} from the environment variable "
            f"{variable}={','.join(patterns)!r} (fix or unset it); {hint}")


def _files_fn(
    config_fn: Callable[[], TextFilesConfig], task_name: str, hint: str
) -> Callable[[str], sources.SplitFiles]:
    """`split -> SplitFiles`, expanding the patterns `config_fn()` gives now."""

    def files_fn(split: str) -> sources.SplitFiles:
        config = config_fn()
        common = dict(
            document_mode=config.document_mode,
            max_document_bytes=config.max_document_bytes,
        )
        if not config.train_patterns:
            raise ValueError(f"Task {task_name!r} has no train file patterns; {hint}")
        if split == "validation" and config.validation_patterns:
            validation_hint = _hint(config, VALIDATION_FILES_ENV, config.validation_patterns, hint)
            files = files_lib.expand_patterns(config.validation_patterns, f"{task_name} validation", validation_hint)
            files_lib.check_some_text(files, f"{task_name} validation", validation_hint)
            return sources.SplitFiles(files=files, **common)
        train_hint = _hint(config, TRAIN_FILES_ENV, config.train_patterns, hint)
        files = files_lib.expand_patterns(config.train_patterns, f"{task_name} train", train_hint)
        files_lib.check_some_text(files, f"{task_name} train", train_hint)
        if config.validation_patterns:  # 'train' is all of the train files.
            return sources.SplitFiles(files=files, **common)
        return sources.SplitFiles(
            files=files,
            validation_fraction=config.validation_fraction,
            is_validation=split == "validation",
            **common,
        )

    return files_fn


def _register(
    name: str,
    config_fn: Callable[[], TextFilesConfig],
    vocabulary: registry.VocabularyOrFn,
    hint: str,
) -> seqio.Task:
    source = sources.TextFileSource(
        _files_fn(config_fn, name, hint), description=f"{name}: local text files"
    )
    return registry.add_lm_task(name, source, vocabulary)


def register_text_files_task(
    name: str,
    train_patterns,
    validation_patterns=None,
    vocabulary: vocab_lib.VocabularySpec = "byte",
    validation_fraction: float = files_lib.VALIDATION_FRACTION,
    document_mode: str = "file",
    max_document_bytes: Optional[int] = sources.DEFAULT_MAX_DOCUMENT_BYTES,
) -> seqio.Task:
    """Registers (or replaces) an LM task `name` over local text files.

    Args:
      name: the task name.
      train_patterns: glob pattern(s) of the training files: a string (commas
        separate several) or a list. Expanded when a dataset is built.
      validation_patterns: pattern(s) of the validation files. When None, the
        train files are split by document hash (`validation_fraction`).
      vocabulary: 'byte', the path of a SentencePiece .model file (checked when
        first used), or a seqio.Vocabulary.
      validation_fraction: share of documents for 'validation' when splitting.
      document_mode: 'file', 'paragraph' or 'line' (see the module docstring).
      max_document_bytes: in 'file' mode, cut longer files into documents of
        about this size at line boundaries (None: never).

    Returns:
      The registered seqio.Task.

    Raises:
      ValueError: bad settings (no train pattern, unknown mode, bad fraction).
    """
    config = TextFilesConfig.from_patterns(train_patterns, validation_patterns, vocabulary, validation_fraction,
                                           document_mode, max_document_bytes)
    if not config.train_patterns:
        raise ValueError(f"register_text_files_task({name!r}): no train_patterns given")
    hint = f"the patterns were given to register_text_files_task({name!r}, ...)"
    return _register(name, lambda: config, vocab_lib.task_vocabulary(vocabulary), hint)


def register_default_text_files_task() -> seqio.Task:
    """Registers `text_files`, configured by Gin / the environment at build time."""
    def vocabulary_fn():
        return vocab_lib.get_vocabulary(text_files_config().vocabulary)

    return _register(TEXT_FILES_TASK, text_files_config, vocabulary_fn, _DEFAULT_TASK_HINT)


register_default_text_files_task()
