"""Registering tasks, finding them by name, and importing users' task modules.

* `add_lm_task(name, source, vocabulary)`: registers (or replaces) a decoder-only
  LM task. Replacing makes every registration idempotent: importing a module
  twice, `importlib.reload`, or re-registering with new settings never raises
  seqio's "duplicate provider" error.
* `get_task_or_mixture(name)`: `seqio.get_mixture_or_task` with an error that
  lists what is registered and how to register more.
* `import_task_module(module)`: imports MIXTURE_OR_TASK_MODULE, by dotted name
  or .py path, with an error that names it and shows why it failed.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import traceback
from types import ModuleType
from typing import Callable, List, Sequence, Union

import seqio

from . import preprocessors


VocabularyOrFn = Union[seqio.Vocabulary, Callable[[], seqio.Vocabulary]]


class LazyVocabularyTask(seqio.Task):
    """A `seqio.Task` whose vocabulary is chosen when `output_features` is read.

    `vocabulary_fn()` is called on every read of `output_features` (by the
    trainer, by seqio while building a dataset, by a Mixture comparing its
    tasks) and must be cheap: the vocabularies of `olmax.tasks.vocab` are
    cached. Everyone sees a concrete vocabulary object (a ByteVocabulary or a
    SentencePieceVocabulary), yet the choice can come from Gin bindings parsed
    after the task was registered, and a missing model file is reported only
    when the vocabulary is needed.
    """

    def __init__(self, *args, vocabulary_fn: Callable[[], seqio.Vocabulary], **kwargs):
        self._vocabulary_fn = vocabulary_fn
        super().__init__(*args, **kwargs)

    @property
    def output_features(self):
        return preprocessors.lm_output_features(self._vocabulary_fn())


def add_lm_task(
    name: str,
    source: seqio.DataSource,
    vocabulary: VocabularyOrFn,
    text_key: str = "text",
    cache_placeholder: bool = False,
) -> seqio.Task:
    """Registers a task with a 'targets' feature and the LM preprocessors.

    Args:
      name: task name; an existing task of that name is replaced.
      source: the seqio DataSource, giving examples with a `text_key` string.
      vocabulary: a seqio.Vocabulary, or a zero-argument function returning one
        when needed (the task is then a `LazyVocabularyTask`).
      text_key: the source's text feature.
      cache_placeholder: add `seqio.CacheDatasetPlaceholder` after tokenizing.
    """
    kwargs = dict(
        source=source,
        preprocessors=preprocessors.lm_preprocessors(
            text_key=text_key, cache_placeholder=cache_placeholder
        ),
    )
    seqio.TaskRegistry.remove(name)
    if isinstance(vocabulary, seqio.Vocabulary):
        return seqio.TaskRegistry.add(
            name, output_features=preprocessors.lm_output_features(vocabulary), **kwargs
        )
    # seqio.Task needs output features at construction; the byte ones stand in
    # and are never read (the property above replaces them).
    return seqio.TaskRegistry.add(
        name,
        output_features=preprocessors.lm_output_features(seqio.ByteVocabulary()),
        task_cls=LazyVocabularyTask,
        vocabulary_fn=vocabulary,
        **kwargs,
    )


def registered_names() -> List[str]:
    """Sorted names of all registered tasks and mixtures."""
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_task_or_mixture(name: str):
    """The registered `seqio.Task` or `seqio.Mixture` called `name`.

    Raises:
      ValueError: `name` is not registered. The message lists close matches and
        all registered task and mixture names, and how to register a module.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Task or mixture name must be a non-empty string, got {name!r}")
    tasks = sorted(seqio.TaskRegistry.names())
    mixtures = sorted(seqio.MixtureRegistry.names())
    if name in tasks or name in mixtures:
        return seqio.get_mixture_or_task(name)
    close = difflib.get_close_matches(name, tasks + mixtures, n=3)
    did_you_mean = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"No task or mixture named {name!r} is registered.{did_you_mean}\n"
        f"Registered tasks: {', '.join(tasks) or '(none)'}\n"
        f"Registered mixtures: {', '.join(mixtures) or '(none)'}\n"
        "To use your own, register it with seqio.TaskRegistry.add(...) in a Python "
        "module and name that module: "
        "--gin.MIXTURE_OR_TASK_MODULE=\"'my_tasks'\" (a dotted module name on the "
        "Python path, or the path of a .py file)."
    )


def _import_file(path: str) -> ModuleType:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such file: {path!r}")
    # One module per file: importing the same file again returns the module
    # already loaded (re-running it could register its tasks twice).
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and os.path.abspath(module.__file__) == path:
            return module
    stem = os.path.splitext(os.path.basename(path))[0]
    name = stem if stem.isidentifier() and stem not in sys.modules else (
        "olmax_user_tasks_" + "".join(c if c.isalnum() else "_" for c in path)
    )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_dotted(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # Like `python -m`, also look in the working directory: console scripts
        # (olmax-train) do not put it on sys.path.
        top = name.split(".")[0]
        cwd = os.getcwd()
        if e.name == top and cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
            return importlib.import_module(name)
        raise


def import_task_module(
    module: Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]],
) -> List[ModuleType]:
    """Imports the module(s) that register a user's tasks and mixtures.

    Args:
      module: None / '' (nothing to import), a dotted module name
        ('my_project.tasks'), a path to a .py file ('tasks/my_tasks.py'), or a
        list of these (a string may also hold several, comma separated).

    Returns:
      The imported modules.

    Raises:
      ImportError: naming the module and showing the original exception (which is
        also chained as `__cause__`).
    """
    if module is None:
        return []
    if isinstance(module, (str, os.PathLike)):
        names = [m.strip() for m in os.fsdecode(module).split(",") if m.strip()]
    else:
        names = [os.fsdecode(m).strip() for m in module if os.fsdecode(m).strip()]
    imported = []
    for name in names:
        is_path = name.endswith(".py") or os.sep in name or "/" in name
        try:
            imported.append(_import_file(name) if is_path else _import_dotted(name))
        except Exception as e:  # pylint: disable=broad-except
            origin = "".join(traceback.format_exception_only(type(e), e)).strip()
            if is_path:
                check = f"`python {name}` runs cleanly"
            else:
                check = f"`python -c 'import {name}'` works from the directory you run in"
            raise ImportError(
                f"Could not import the task {'file' if is_path else 'module'} {name!r} "
                f"(MIXTURE_OR_TASK_MODULE): {origin}\nCheck that {check}; give a "
                "dotted module name on the Python path or the path of a .py file."
            ) from e
    return imported

