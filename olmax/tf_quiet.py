"""TensorFlow for tf.data only: imported without its start-up chatter, kept off the GPUs.

Olmax runs TensorFlow for seqio's input pipelines, never for compute. Importing it
prints CUDA probing from C++ straight to the process's stderr, before Python logging
exists ("Could not find cuda drivers on your machine", "failed call to cuInit:
UNKNOWN ERROR (303)"), so on a CPU machine the first lines a user read looked like
errors. Two remedies:

  install()            run by `import olmax`: the first `import tensorflow` of the
                       process, whoever triggers it (seqio, clu, tfds), runs with file
                       descriptor 2 sent to a temporary file. If the import fails, what
                       it printed is replayed before the exception propagates.
  hide_accelerators()  run by each binary before anything touches TensorFlow's
                       runtime: TensorFlow sees no GPU (JAX owns them), and the CUDA
                       probing this triggers is silenced the same way.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile


@contextlib.contextmanager
def silenced_stderr():
    """Sends file descriptor 2 (C++ logging included) to a temporary file; replays it on an exception."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))


class _QuietLoader(importlib.abc.Loader):
    """Wraps TensorFlow's own loader; only the execution of its __init__ is silenced."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with silenced_stderr():
            self._loader.exec_module(module)

    def __getattr__(self, name):  # resource readers and the like: TensorFlow's loader answers
        return getattr(self._loader, name)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        uninstall()  # once per process
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_FINDER = _QuietFinder()


def install() -> None:
    """Silences the first `import tensorflow` of this process (no-op once it is imported)."""
    if "tensorflow" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def hide_accelerators() -> None:
    """TensorFlow's runtime sees no GPU; call before any TensorFlow op runs."""
    install()
    with silenced_stderr():
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # the runtime already started (a library user ran TF ops first)
            pass
