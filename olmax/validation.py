"""Checks on the values users set, made where the values enter (configs, binaries' arguments).

Gin passes on whatever it is given, and the binaries read a `--gin.KEY=VALUE` that is
not a Python literal as a string. Without these checks `--gin.BATCH_SIZE=four`,
`--gin.TRAIN_STEPS=1e1` (a float) or `learning_rate=nan` (a string) fail far away
with messages about string formatting or operand types. Each check raises a
ValueError naming the setting (and the macro users usually set it with), the value,
and the fix, e.g.

    BATCH_SIZE (utils.DatasetConfig.batch_size) = 'four' is not a whole number; set a
    positive integer, e.g. --gin.BATCH_SIZE=16.
"""
from __future__ import annotations

import math
import numbers
import os
import socket
from typing import Any, Mapping

import gin


def _label(name: str, macro: str | None) -> str:
    return f"{macro} ({name})" if macro else name


def _flag(name: str, macro: str | None) -> str:
    return f"--gin.{macro or name}"


def required(value: Any, name: str, *, macro: str | None = None, example: str = "VALUE") -> Any:
    """Raises when `value` is Gin's %gin.REQUIRED placeholder (a macro nobody set)."""
    if value is gin.REQUIRED:
        raise ValueError(f"{_label(name, macro)} is required but not set; set it in a gin file or with "
                         f"{_flag(name, macro)}={example}.")
    return value


def integer(value: Any, name: str, *, minimum: int | None = None, macro: str | None = None,
            example: int = 16, allow_none: bool = False) -> int | None:
    """`value` as an int, or a ValueError naming `name` (the Gin parameter) and `macro`.

    Rejects strings (a mistyped number), bools, and floats, even whole ones: `1e1` is
    a float in Gin, and saying so is clearer than rounding silently.
    """
    if value is None and allow_none:
        return None
    required(value, name, macro=macro, example=str(example))
    label, flag = _label(name, macro), _flag(name, macro)
    at_least = f" >= {minimum}" if minimum is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ""
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
                and float(value).is_integer():
            hint = " (a float: 1e1-style numbers are floats in Gin)"
            example = int(value)
        raise ValueError(f"{label} = {value!r} is not a whole number{hint}; set an integer{at_least}, "
                         f"e.g. {flag}={example}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{label} = {value!r} must be{at_least}; e.g. {flag}={max(example, minimum)}.")
    return int(value)


def number(value: Any, name: str, *, minimum: float | None = None, positive: bool = False,
           maximum: float | None = None, macro: str | None = None, example: str = "1e-3",
           allow_none: bool = False) -> float | None:
    """`value` as a finite float (ints welcome), or a ValueError naming `name` and the fix."""
    if value is None and allow_none:
        return None
    required(value, name, macro=macro, example=example)
    label, flag = _label(name, macro), _flag(name, macro)
    bounds = [f"> {minimum}" if positive else f">= {minimum}"] if minimum is not None else []
    bounds += [f"<= {maximum}"] if maximum is not None else []
    want = f"a finite number {' and '.join(bounds)}".rstrip()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{label} = {value!r} is not a number; set {want}, e.g. {flag}={example}.")
    if not math.isfinite(value):
        raise ValueError(f"{label} = {value!r} is not finite; set {want}, e.g. {flag}={example}.")
    too_low = minimum is not None and (value <= minimum if positive else value < minimum)
    if too_low or (maximum is not None and value > maximum):
        raise ValueError(f"{label} = {value!r} is out of range; set {want}, e.g. {flag}={example}.")
    return float(value)


def choice(value: Any, name: str, options: tuple, *, macro: str | None = None) -> Any:
    if value not in options:
        raise ValueError(f"{_label(name, macro)} = {value!r} is not one of {', '.join(map(repr, options))}.")
    return value


def feature_lengths(value: Any, name: str = "utils.DatasetConfig.task_feature_lengths",
                    macro: str = "TASK_FEATURE_LENGTHS") -> dict[str, int]:
    """A {'feature': length} mapping of positive ints (e.g. {'targets': 256})."""
    required(value, name, macro=macro, example="\"{'targets': 256}\"")
    label = _label(name, macro)
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{label} = {value!r} is not a mapping of feature lengths; set e.g. "
                         f"--gin.{macro}=\"{{'targets': 256}}\".")
    if "targets" not in value:
        raise ValueError(f"{label} = {value!r} has no 'targets' length, which every task needs; set e.g. "
                         f"--gin.{macro}=\"{{'targets': 256}}\" ({{'inputs': 128, 'targets': 128}} for a prefix-LM "
                         "task).")
    for feature, length in value.items():
        integer(length, f"{name}[{feature!r}]", minimum=1, example=256)
    return dict(value)


def prepare_model_dir(model_dir: Any, name: str = "MODEL_DIR") -> str:
    """Creates a local MODEL_DIR and proves it writable; one clear error otherwise.

    Remote paths (gs://...) are left to the storage layer. Returns the path.
    """
    required(model_dir, name, example="runs/my_run")
    if not isinstance(model_dir, (str, os.PathLike)) or not os.fspath(model_dir):
        raise ValueError(f"{name} = {model_dir!r} is not a path; set e.g. --gin.{name}=runs/my_run.")
    path = os.fspath(model_dir)
    if "://" in path:
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} = {path!r} is a file, not a directory; choose another {name}.")
    probe = os.path.join(path, f".olmax-write-test-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ValueError(f"{name} = {path!r} cannot be written ({reason}: {e.filename or path}); "
                         f"choose a directory you can write to.") from None
    return path


def check_output_dir(path: str, name: str, fix: str) -> str:
    """Raises ValueError, ending in `fix`, unless `path` is a directory that exists and can be
    written or can be created. Creates nothing: a binary that fails later leaves nothing behind.
    Remote paths (gs://...) are left to the storage layer."""
    path = os.fspath(path)
    if "://" in path:
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} = {path!r} is a file, not a directory; {fix}.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{name} = {path!r} cannot be created: {existing} is a file; {fix}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} = {path!r} cannot be written (no write permission or a read-only filesystem: "
                         f"{existing}); {fix}.")
    return path


def output_dir(path: str | None, macro: str, checkpoint_directory: str, default_name: str) -> str:
    """The output directory of eval or infer, checked (`check_output_dir`): the macro's `path`,
    or <checkpoint_directory>/<default_name> when it is unset."""
    if path:
        return check_output_dir(path, macro, f"set --gin.{macro} to a directory")
    return check_output_dir(os.path.join(checkpoint_directory, default_name),
                            f"{macro} (unset: <checkpoint directory>/{default_name})",
                            f"set --gin.{macro} to a directory you can write to")


def check_train_args(*, total_steps, eval_steps, eval_period, stats_period, microbatches, random_seed,
                     max_consecutive_nonfinite) -> None:
    """olmax.train.train's numbers (TRAIN_STEPS and the periods)."""
    name = "train.train."
    integer(total_steps, name + "total_steps", minimum=1, macro="TRAIN_STEPS", example=1000)
    integer(eval_steps, name + "eval_steps", minimum=1, example=20, allow_none=True)
    integer(eval_period, name + "eval_period", minimum=0, example=1000)  # 0: no periodic eval
    integer(stats_period, name + "stats_period", minimum=1, example=100)
    integer(microbatches, name + "microbatches", minimum=1, example=1)
    integer(random_seed, name + "random_seed", macro="RANDOM_SEED", example=0)
    integer(max_consecutive_nonfinite, name + "max_consecutive_nonfinite", minimum=1, example=10)


def check_infer_args(*, num_samples, max_examples, prompt_length, max_decode_length, temperature, top_k,
                     top_p) -> None:
    """olmax.infer.infer's sampling settings; `--num_samples 0` would print nothing."""
    name = "infer.infer."
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"--num_samples={num_samples!r}: give at least 1 (how many continuations of --prompt "
                         "to print), e.g. --num_samples 3.")
    integer(max_examples, name + "max_examples", minimum=1, example=64, allow_none=True)
    integer(prompt_length, name + "prompt_length", minimum=1, example=32)
    integer(max_decode_length, name + "max_decode_length", minimum=1, example=128)
    number(temperature, name + "temperature", minimum=0, example="1.0")
    integer(top_k, name + "top_k", minimum=0, example=0)
    number(top_p, name + "top_p", minimum=0, positive=True, maximum=1, example="0.9")
