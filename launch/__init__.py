"""Launchers: the same `python -m olmax.train` command on one machine, a TPU VM pod, or XManager.

    python -m launch.local  --num_processes 2 --devices_per_process 2 -- --gin_file=gin/quickstart.gin
    python -m launch.tpu_vm --tpu my-pod --zone us-central2-b --accelerator_type v4-32 -- --gin_file=...
    python -m launch.xm_launch --accelerator tpu_v3 --accelerator_count 32 --model_dir gs://b/run1 -- --gin_file=...

Each takes `--dry_run` (print what it would run, run nothing) and forwards every
argument after `--` to the binary unchanged. They import neither jax nor olmax, so
they run on a laptop that only has gcloud (or xmanager) installed.
"""
import shlex
from typing import Sequence


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher args, binary args): everything after the first `--` goes to the binary."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def shell_quote(arg: str) -> str:
    """shlex.quote, but "double quotes" when that needs no escaping: gin values read better
    ("--gin.MODEL_DIR='runs/x'" rather than '--gin.MODEL_DIR='"'"'runs/x'"'"'')."""
    quoted = shlex.quote(arg)
    if quoted == arg or any(c in arg for c in '"$`\\!'):
        return quoted
    return f'"{arg}"'


def shell_join(argv: Sequence[str]) -> str:
    """The argv as one line a POSIX shell splits back into exactly these arguments."""
    return " ".join(shell_quote(a) for a in argv)
