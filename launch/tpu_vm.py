r"""Train on a Cloud TPU VM pod slice: the same command on every worker, through gcloud.

    python -m launch.tpu_vm --tpu=olmax-pod --zone=us-central2-b --accelerator_type=v4-32 -- \
        --gin_file=gin/models/small.gin --gin_file=gin/runs/pretrain.gin \
        --gin.MODEL_DIR="'gs://my-bucket/small'" --gin.MIXTURE_OR_TASK_NAME="'c4_en_bytes'" \
        --gin.TASK_FEATURE_LENGTHS="{'targets': 2048}" --gin.TRAIN_STEPS=100000

Steps, each one gcloud command (`--dry_run` prints them all and runs nothing):
  1. reuse the TPU VM if `describe` finds it, else `create` it (--spot for spot capacity);
  2. install Olmax on every worker (--worker=all) into a fresh directory
     ~/olmax-<UTC time>, never deleting an earlier one (a run may have written there):
     this checkout's files (tracked and untracked, not ignored) copied with `scp`, or
     `git clone` of --git_url at --git_ref; then `pip install -e ".[tpu]"` and point the
     link ~/olmax-current at it;
  3. run `python3 -m olmax.train <args after -->` on every worker at once and stream
     their output here. Each worker is one JAX process; olmax.multihost finds the
     others by itself on a TPU VM (no coordinator flags). With --detach the run goes
     on under nohup and this script only follows worker 0's log (Ctrl-C stops the
     following, not the training).
MODEL_DIR must be a bucket (gs://...) that every worker can write: checkpoints are
written cooperatively by all workers, TensorBoard events and config.gin by worker 0.
The launcher refuses a relative or local MODEL_DIR (each worker would write its own
disk, inside a directory a later launch does not use); `--allow_local_model_dir`
accepts an absolute path on a file system every worker mounts (NFS, Filestore).
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Sequence

from launch import shell_join, split_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/olmax-current"  # a link to the latest install; earlier ones are kept
LOG = "~/olmax-run.log"
ARCHIVE = "/tmp/olmax-src.tar.gz"


def _gcloud(verb: str, first: str, args: argparse.Namespace, *extra: str) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB FIRST [extra...] --zone [--project]` (FIRST: the TPU, or scp's source)."""
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, first, *extra, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def _ssh_all(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    return _gcloud("ssh", args.tpu, args, f"--worker={worker}", f"--command={command}")


def train_command(args: argparse.Namespace, binary_args: Sequence[str]) -> str:
    """The shell line every worker runs."""
    exports = "".join(f"export {shlex.quote(e)}; " for e in args.env)
    run = shell_join(["python3", "-m", args.module, *binary_args])
    if args.detach:
        return f"cd {REMOTE_DIR} && {exports}nohup {run} > {LOG} 2>&1 < /dev/null &"
    return f"cd {REMOTE_DIR} && {exports}{run} 2>&1 | tee {LOG}"


def plan(args: argparse.Namespace, binary_args: Sequence[str]) -> dict[str, list[list[str]]]:
    """The commands of each stage, in order: {'find': [...], 'create': [...], 'install': [...], 'run': [...]}."""
    create = ["--accelerator-type=" + args.accelerator_type, "--version=" + args.version]
    if args.spot:
        create.append("--spot")
    stages = {
        "find": [_gcloud("describe", args.tpu, args, "--format=value(state)")],
        "create": [_gcloud("create", args.tpu, args, *create)],
        "install": [],
        "run": [_ssh_all(args, train_command(args, binary_args))],
    }
    fresh = f"~/olmax-{args.release}"
    # `mkdir` without -p fails if the directory exists: nothing is ever unpacked over (or deleted from) a
    # directory an earlier launch made; `ln -sfn` only moves the link.
    pip = f'cd {fresh} && python3 -m pip install -q -e ".[tpu]" && ln -sfn {fresh} {REMOTE_DIR}'
    if args.skip_install:
        pass
    elif args.git_url:
        clone = (f"git clone {shlex.quote(args.git_url)} {fresh} && cd {fresh} && "
                 f"git checkout -q {shlex.quote(args.git_ref)} && ")
        stages["install"].append(_ssh_all(args, clone + pip))
    else:
        stages["install"] += [
            ["tar", "czf", ARCHIVE, "-C", REPO, "--files-from=-"],  # stdin: git ls-files -co --exclude-standard
            _gcloud("scp", ARCHIVE, args, f"{args.tpu}:{os.path.basename(ARCHIVE)}", "--worker=all"),
            _ssh_all(args, f"mkdir {fresh} && tar xzf ~/{os.path.basename(ARCHIVE)} -C {fresh} && " + pip),
        ]
    if args.detach:
        stages["run"].append(_ssh_all(args, f"sleep 5; tail -n +1 -f {LOG}", worker="0"))
    return stages


_DIR_MACROS = ("MODEL_DIR", "CHECKPOINT_PATH", "EVAL_OUTPUT_DIR", "INFER_OUTPUT_DIR")
_BINDING = re.compile(r"^\s*(%s)\s*=\s*(.+?)\s*$" % "|".join(_DIR_MACROS), re.M)


def _unquote(value: str) -> str:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    return parsed if isinstance(parsed, str) else value


def directory_settings(binary_args: Sequence[str]) -> dict[str, str]:
    """The run's directories (MODEL_DIR, CHECKPOINT_PATH, ...): from `--gin.KEY=VALUE` and
    `--gin_bindings`, else from a `KEY = ...` line of a local --gin_file (later wins)."""
    found: dict[str, str] = {}
    for arg in binary_args:
        if arg.startswith("--gin_file="):
            path = arg.split("=", 1)[1]
            # As the binaries find it: the working directory, the checkout, then the package (olmax/gin/...).
            candidates = (path, os.path.join(REPO, path), os.path.join(REPO, "olmax", path))
            path = next((p for p in candidates if os.path.isfile(p)), None)
            if path:
                for key, value in _BINDING.findall(open(path).read()):
                    found[key] = _unquote(value.split("#")[0].strip())
    for arg in binary_args:
        m = re.match(r"^--gin\.(%s)=(.*)$" % "|".join(_DIR_MACROS), arg, re.S)
        m = m or re.match(r"^--gin_bindings=\s*(%s)\s*=\s*(.*)$" % "|".join(_DIR_MACROS), arg, re.S)
        if m:
            found[m.group(1)] = _unquote(m.group(2).strip())
    return {k: v for k, v in found.items() if v not in ("None", "%gin.REQUIRED")}


def check_directories(module: str, binary_args: Sequence[str], allow_local: bool) -> None:
    """Refuses directories the workers cannot share; raises ValueError with the fix."""
    dirs = directory_settings(binary_args)
    needed = ("MODEL_DIR",) if module == "olmax.train" else ("MODEL_DIR", "CHECKPOINT_PATH")
    if not any(k in dirs for k in needed):
        raise ValueError(f"{' or '.join(needed)} is not set; a pod launch needs a bucket every worker can reach, "
                         "e.g. --gin.MODEL_DIR=gs://my-bucket/run1 after `--`.")
    for key, value in dirs.items():
        if "://" in value:
            continue
        if not os.path.isabs(os.path.expanduser(value)):
            raise ValueError(f"{key}={value!r} is a relative path: on a pod it would be a different directory on "
                             f"each worker's disk. Use a bucket, e.g. --gin.{key}=gs://my-bucket/run1.")
        if not allow_local:
            raise ValueError(f"{key}={value!r} is a local path: each worker would write its own disk. Use a bucket "
                             f"(--gin.{key}=gs://my-bucket/run1), or --allow_local_model_dir if every worker "
                             "mounts that path from a shared file system.")


def describe(stages: dict[str, list[list[str]]]) -> str:
    lines = []
    for cmd in stages["find"]:
        lines.append(f"{shell_join(cmd)}  # reuse the TPU VM if this succeeds, else:")
    for cmd in stages["create"]:
        lines.append(f"  {shell_join(cmd)}")
    for cmd in stages["install"]:
        if cmd[0] == "tar":
            lines.append(f"(cd {shlex.quote(REPO)} && git ls-files -co --exclude-standard) | {shell_join(cmd)}")
        else:
            lines.append(shell_join(cmd))
    lines += [shell_join(cmd) for cmd in stages["run"]]
    return "\n".join(lines)


def execute(stages: dict[str, list[list[str]]]) -> int:
    found = subprocess.run(stages["find"][0], capture_output=True, text=True)
    if found.returncode == 0:
        print(f"Reusing TPU VM ({found.stdout.strip() or 'state unknown'}).", flush=True)
    else:
        for cmd in stages["create"]:
            print("+", shell_join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    for cmd in stages["install"]:
        print("+", shell_join(cmd), flush=True)
        if cmd[0] == "tar":
            files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                                   capture_output=True, text=True).stdout
            subprocess.run(cmd, input=files, text=True, check=True)
        else:
            subprocess.run(cmd, check=True)
    rc = 0
    for cmd in stages["run"]:
        print("+", shell_join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode or rc
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    own, binary_args = split_argv(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after `--` go to the binary unchanged.")
    parser.add_argument("--tpu", required=True, help="TPU VM name (created if it does not exist)")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-32, v5p-64, v5litepod-16 (for create)")
    parser.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software version (for create)")
    parser.add_argument("--spot", action="store_true", help="create a spot TPU VM (preemptible; training resumes)")
    parser.add_argument("--git_url", default=None, help="clone this repository instead of copying the checkout")
    parser.add_argument("--git_ref", default="main")
    parser.add_argument("--skip_install", action="store_true", help=f"the workers already have Olmax in {REMOTE_DIR}")
    parser.add_argument("--allow_local_model_dir", action="store_true",
                        help="accept an absolute MODEL_DIR that every worker mounts from a shared file system")
    parser.add_argument("--module", default="olmax.train", help="olmax.train, olmax.eval or olmax.infer")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE exported on every worker (repeatable)")
    parser.add_argument("--detach", action="store_true", help="run under nohup and follow worker 0's log")
    parser.add_argument("--dry_run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(own)
    if not binary_args:
        parser.error("give the binary's arguments after `--`, e.g. -- --gin_file=gin/models/small.gin ...")
    try:
        check_directories(args.module, binary_args, args.allow_local_model_dir)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    args.release = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    stages = plan(args, binary_args)
    if args.dry_run:
        print(describe(stages))
        return 0
    return execute(stages)


if __name__ == "__main__":
    sys.exit(main())
