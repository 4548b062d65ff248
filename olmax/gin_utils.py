"""Command-line handling shared by the binaries: T5X's Gin flags, with fewer sharp edges.

Flags (as in T5X): --gin_file (repeatable, later wins), --gin_bindings (repeatable),
--gin.KEY=VALUE (shorthand for a binding), --gin_search_paths.

Where T5X is awkward we are lenient in one way only: a --gin.KEY=VALUE whose VALUE
is not a Python literal, a gin reference (@x) or a macro (%X) is taken as a string,
so `--gin.MODEL_DIR=runs/q` works as well as `--gin.MODEL_DIR="'runs/q'"`.
Gin errors (typos, unknown configurables) are re-raised naming the file and line, and
a macro that is set but read by no binding (`--gin.TRAIN_STEP=10`) is an error naming
the nearest macro that is read, where Gin would silently ignore it.
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib
import logging
import os
import pathlib
import re
import sys
import tokenize
from typing import Any, Callable, NoReturn, Sequence

import gin
from absl import flags

_GIN_FLAG = re.compile(r"^--gin\.([^=]+)=(.*)$", re.S)


def define_flags() -> None:
    """The T5X gin flags plus multi-host flags (idempotent)."""
    if "gin_file" in flags.FLAGS:
        return
    flags.DEFINE_multi_string("gin_file", [], "Gin files, in order (later files override earlier ones).")
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'MODEL_DIR = \"runs/x\"'.")
    flags.DEFINE_list("gin_search_paths", [], "Extra directories to look up --gin_file and gin includes in.")
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory for TFDS-backed tasks.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, when not auto-detected).")
    flags.DEFINE_integer("process_count", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_index", None, "This process's index (multi-host).")


def package_gin_dir() -> str:
    """olmax/gin: Olmax's gin files, package data in a checkout and in a pip install alike.
    Not an importable package on purpose: nothing there is Python."""
    return str(pathlib.Path(__file__).resolve().parent / "gin")


def default_search_paths() -> list[str]:
    # `gin/models/tiny.gin` resolves against the working directory, else the olmax package.
    return [os.getcwd(), os.path.dirname(package_gin_dir())]


def _as_gin_value(value: str) -> str:
    stripped = value.strip()
    if not stripped or stripped[0] in "@%" or stripped in ("None", "True", "False"):
        return stripped
    try:
        ast.literal_eval(stripped)
        return stripped
    except (ValueError, SyntaxError):
        return repr(stripped)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """--gin.KEY=VALUE -> --gin_bindings='KEY = VALUE' (absl does not know dotted flags)."""
    out = []
    for arg in argv:
        m = _GIN_FLAG.match(arg)
        if m:
            out.append(f"--gin_bindings={m.group(1)} = {_as_gin_value(m.group(2))}")
        else:
            out.append(arg)
    return out


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str], search_paths: Sequence[str] = (),
          run_file: str | None = None) -> None:
    """Parses `run_file`, then the files, then the bindings.

    Each binary reads its own run file (gin/runs/{pretrain,eval,infer}.gin) first, so
    `--gin_file=gin/quickstart.gin` alone is a complete eval or infer command, and an
    experiment file's macros are never reset by a run file parsed after it. Errors
    name the file and line (or the binding).
    """
    for path in list(search_paths) + default_search_paths():
        gin.add_config_file_search_path(path)
    if not gin_files:
        raise ValueError("No --gin_file given; start from e.g. --gin_file=gin/quickstart.gin.")
    if run_file:
        gin_files = [os.path.join(package_gin_dir(), run_file)] + [
            f for f in gin_files if os.path.normpath(f) != os.path.normpath(os.path.join("gin", run_file))
        ]
    for f in gin_files:
        _check_exists(f, list(search_paths))
    # File by file (as gin.parse_config_files_and_bindings does) to know which one failed.
    for f in gin_files:
        try:
            gin.parse_config_file(f)
        except Exception as e:  # gin raises several types; all are user config errors here
            raise GinConfigError(describe_gin_error(e, [f], [], list(search_paths))) from e
    try:
        gin.parse_config(gin_bindings)
    except Exception as e:  # noqa: BLE001
        raise GinConfigError(describe_gin_error(e, [], gin_bindings)) from e
    check_macros_are_read(gin_files, gin_bindings)


_MACRO_USE = re.compile(r"%([A-Za-z_][\w.]*)")
_MACRO_DEFINITION = re.compile(r"^([A-Za-z_]\w*)\s*=", re.M)


def _package_macros() -> tuple[set[str], set[str]]:
    """(macros Olmax's own gin files read, macros they set). Every binary's run file counts, so
    a user file that sets EVAL_OUTPUT_DIR for olmax.eval also works with olmax.train."""
    read, defined = set(), set()
    for path in pathlib.Path(package_gin_dir()).rglob("*.gin"):
        text = path.read_text(encoding="utf-8")
        read.update(_MACRO_USE.findall(text))
        defined.update(_MACRO_DEFINITION.findall(text))
    return read, defined


def check_macros_are_read(gin_files: Sequence[str], gin_bindings: Sequence[str]) -> None:
    """Raises GinConfigError for a macro set on the command line or in a user's gin file that no
    binding reads (in the parsed config or in any of Olmax's gin files): Gin keeps it and uses
    it nowhere, so `--gin.TRAIN_STEP=10` would train for the file's TRAIN_STEPS and exit 0."""
    config = dict(gin.config._CONFIG)  # gin has no public listing of its bindings
    bound = {scope for scope, selector in config if selector == "gin.macro"}
    read = {"/".join(ref.scopes) for ref in gin.config.iterate_references(config)
            if ref.configurable.wrapped is gin.config.macro}
    package_read, package_defined = _package_macros()
    unread = sorted(bound - read - package_read - package_defined)
    if not unread:
        return
    known = sorted(read | package_read)
    on_command_line = set(_MACRO_DEFINITION.findall("\n".join(b.strip() for b in gin_bindings)))
    problems = []
    for name in unread:
        where = f"--gin.{name}" if name in on_command_line else _defining_file(name, gin_files) or "a gin file"
        nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.6) or difflib.get_close_matches(
            name.upper(), known, n=1, cutoff=0.6)
        hint = f"did you mean {nearest[0]}?" if nearest else "no binding uses it: remove it or fix its name"
        problems.append(f"macro {name} (set in {where}) is read by no binding; {hint}")
    raise GinConfigError("Gin configuration error: " + "; ".join(problems))


def _defining_file(name: str, gin_files: Sequence[str]) -> str | None:
    """The first of the user's gin files that sets macro `name` at the start of a line."""
    for f in gin_files:
        for candidate in [f] + [os.path.join(base, f) for base in default_search_paths()]:
            if os.path.isfile(candidate):
                text = open(candidate, encoding="utf-8", errors="replace").read()
                if name in _MACRO_DEFINITION.findall(text):
                    return f
                break
    return None


class GinConfigError(ValueError):
    pass


def describe_gin_error(e: Exception, gin_files: Sequence[str], gin_bindings: Sequence[str],
                       search_paths: Sequence[str] = ()) -> str:
    msg = str(e)
    if isinstance(e, tokenize.TokenError) and len(gin_files) == 1:
        found = _unclosed_in(gin_files[0], list(search_paths) + default_search_paths())
        if found:
            path, line, what = found
            return (f"Gin configuration error in {path}, line {line}: {what} "
                    "(gin reads to the end of the file looking for it).")
    if "In file" in msg or "In bindings string" in msg:
        return f"Gin configuration error: {msg}"
    if isinstance(e, SyntaxError) and e.filename and e.lineno:
        return f"Gin configuration error in {e.filename}, line {e.lineno}: {e.msg} (at {(e.text or '').strip()!r})"
    location = getattr(e, "location", None)
    if location is not None and getattr(location, "filename", None):
        return f"Gin configuration error in {location.filename}, line {location.lineno}: {msg}"
    return f"Gin configuration error (files: {list(gin_files)}, bindings: {list(gin_bindings)}): {msg}"


_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""", re.M)


def _unclosed_in(path: str, search_paths: list[str], depth: int = 0) -> tuple[str, int, str] | None:
    """(file, line, what) of a bracket or string left open in `path` or a file it includes."""
    resolved = next((p for p in [path] + [os.path.join(b, path) for b in search_paths] if os.path.isfile(p)), None)
    if resolved is None or depth > 20:
        return None
    text = open(resolved, encoding="utf-8", errors="replace").read()
    for include in _INCLUDE.findall(text):
        found = _unclosed_in(include, search_paths, depth + 1)
        if found:
            return found
    opened = []
    try:
        for tok in tokenize.generate_tokens(iter(text.splitlines(keepends=True)).__next__):
            if tok.type == tokenize.OP and tok.string in "([{":
                opened.append(tok)
            elif tok.type == tokenize.OP and tok.string in ")]}" and opened:
                opened.pop()
    except tokenize.TokenError as e:
        if opened:
            return resolved, opened[-1].start[0], f"{opened[-1].string!r} is never closed"
        return resolved, e.args[1][0], "a multi-line string is never closed"
    except (SyntaxError, StopIteration):
        return None
    return None


def _check_exists(path: str, search_paths: list[str]) -> None:
    if os.path.exists(path):
        return
    for base in search_paths + default_search_paths():
        if os.path.exists(os.path.join(base, path)):
            return
    raise FileNotFoundError(
        f"Gin file {path!r} not found in the working directory or the search paths "
        f"{search_paths + default_search_paths()}; Olmax's own files are under {package_gin_dir()}."
    )


class _LibraryNoise(logging.Filter):
    """Drops the INFO chatter of orbax (per-save timings) and gin's file search
    ("Path not found" while it tries each search path), and orbax's tracebacks of a
    failed background save (the trainer reports it); other warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" in record.pathname and record.levelno >= logging.ERROR:
            # A background save that failed: the trainer stops with one message naming the cause
            # (checkpoints.CheckpointSaveError), so orbax's per-thread tracebacks are left out.
            message = record.getMessage()
            return not ("raised an exception" in message or "thread" in message.lower())
        if "/orbax/" in record.pathname and ("read only" in record.getMessage() or "read_only" in record.getMessage()):
            return False  # eval and infer open checkpoints read-only on purpose: nothing to warn about
        if record.levelno >= logging.WARNING and "resource_reader" not in record.pathname:
            return True
        noisy = ("/orbax/", "resource_reader", "/seqio/", "xla_bridge", "/etils/")
        return not any(n in record.pathname for n in noisy)


def run(main, argv: Sequence[str] | None = None, name: str | None = None) -> None:
    """absl.app.run with --gin.KEY=VALUE support; Olmax's own errors end in one message,
    `<name>: error: ...` (name: the binary, default main's module)."""
    from absl import app

    define_flags()
    argv = rewrite_gin_args(sys.argv if argv is None else argv)
    app.run(functools.partial(_report_errors, main, name or main.__module__), argv=argv)


# Errors Olmax raises on purpose for bad input or a bad file; their message is the whole story.
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)
_UNSET_MACRO = re.compile(r"In call to configurable 'macro' .* in scope '([^']+)'")


def _report_errors(main, name: str, argv):
    """Runs main(argv). An error raised by Olmax's own code (a message written for the
    user) or a Gin binding left unset prints as `<binary>: error: <message>` with exit
    status 1; anything else keeps its traceback, as does everything with OLMAX_TRACEBACK=1."""
    try:
        return main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C: what was stopped, and what is kept, in one line
        if os.environ.get("OLMAX_TRACEBACK"):
            raise
        print(f"{name}: {user_message(e) if str(e) else 'stopped by Ctrl-C'}", file=sys.stderr, flush=True)
        sys.exit(130)
    except (TypeError, RuntimeError, *USER_ERRORS) as e:
        message = _unset_binding(e) if isinstance(e, (TypeError, RuntimeError)) else None
        if isinstance(e, USER_ERRORS) and raised_by_olmax(e):
            message = user_message(e)
        if os.environ.get("OLMAX_TRACEBACK") or message is None:
            raise
        print(f"{name}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def _unset_binding(e: BaseException) -> str | None:
    """The message for Gin's errors about a value nobody set, else None."""
    text = str(e)
    unset = _UNSET_MACRO.search(text)
    if isinstance(e, TypeError) and unset:  # Gin calls an undefined macro's placeholder with no value
        name = unset.group(1)
        return (f"Gin macro %{name} is used but never set; set it in a gin file ({name} = ...) "
                f"or with --gin.{name}=VALUE.")
    if isinstance(e, RuntimeError) and text.startswith("Required bindings for"):
        return user_message(e) + "; bind them in a gin file or with --gin.<configurable>.<parameter>=VALUE."
    return None


def raised_by_olmax(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = os.path.realpath(tb.tb_frame.f_code.co_filename)
    return filename.startswith(_own_code_dirs())


def _own_code_dirs() -> tuple[str, ...]:
    return (os.path.dirname(os.path.realpath(__file__)) + os.sep,)  # olmax/, olmax/tasks/ included


def user_message(e: BaseException) -> str:
    """The exception's message without the `In call to configurable ...` lines Gin appends."""
    lines = [line for line in str(e).splitlines() if not line.strip().startswith("In call to configurable")]
    return "\n".join(lines).strip() or type(e).__name__


def run_importable_module(name: str) -> NoReturn:
    """`python -m olmax.train` (eval, infer) runs the file as `__main__`: called from there before it
    defines anything, this runs the binary of the importable module `name` and exits, so that Gin
    knows one `train`, not a second `__main__.train` that makes `--gin.train.eval_period=...`
    ambiguous."""
    importlib.import_module(name).console_main()
    raise SystemExit(0)


def run_binary(entry: Callable[[], Any], run_file: str, argv: Sequence[str] | None = None) -> None:
    """What the train, eval and infer console scripts do: keep TensorFlow off the GPUs, parse
    the flags, join the other hosts (olmax.multihost), parse Gin (`run_file` first), call `entry()`."""

    from olmax import tf_quiet

    def main(argv):
        del argv
        from olmax import checkpoints, multihost

        checkpoints.hide_closed_event_loop_reports()  # the echoes of a damaged checkpoint's failed read
        multihost.initialize_from_flags()
        parse_from_flags(run_file=run_file)
        entry()

    # TensorFlow off the GPUs (quietly), before app.run, whose start-up already wakes its runtime.
    # Not in run(): the planner must configure JAX's devices before anything imports it.
    tf_quiet.hide_accelerators()
    run(main, argv, name=entry.__module__)


def quiet_library_logs() -> None:
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(_LibraryNoise())


def parse_from_flags(run_file: str | None = None) -> None:
    quiet_library_logs()
    from olmax import tasks  # noqa: F401  registers the tasks and their gin configurables

    fl = flags.FLAGS
    if fl.tfds_data_dir:
        import seqio

        seqio.set_tfds_data_dir_override(fl.tfds_data_dir)
    parse(fl.gin_file, fl.gin_bindings, fl.gin_search_paths, run_file)
