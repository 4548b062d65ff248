r"""Several processes of one binary on this machine, connected like the hosts of a pod.

    python -m launch.local --num_processes 2 --devices_per_process 2 -- \
        --gin_file=gin/quickstart.gin --gin.MODEL_DIR="'runs/two_hosts'"

Starts `python -m olmax.train <args> --coordinator_address=127.0.0.1:PORT
--process_count=N --process_index=I` for I = 0..N-1. On CPU each process gets
`--devices_per_process` simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count)
and the processes talk through JAX's gloo CPU collectives; with `--platform gpu`
each gets its own GPUs (CUDA_VISIBLE_DEVICES). Output lines are prefixed with the
process index (and copied to --log_dir/process_I.log if given). If one process
fails the others are stopped, and what they print from then on (the collectives'
errors about the lost peer) goes to --log_dir only, so the launcher's line naming
the failed process ends the output; SIGTERM / Ctrl-C is forwarded to every process
(the trainer saves a checkpoint and exits). The exit status is the first failure's.
The coordinator listens on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from typing import Sequence

from launch import shell_join, split_argv

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(index: int, devices_per_process: int, platform: str, base_env: dict | None = None) -> dict[str, str]:
    """The environment variables process `index` needs on top of `base_env`."""
    base_env = os.environ if base_env is None else base_env
    if platform == "cpu":
        xla = _DEVICE_COUNT_FLAG.sub("", base_env.get("XLA_FLAGS", "")).strip()
        flag = f"--xla_force_host_platform_device_count={devices_per_process}"
        return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{xla} {flag}".strip()}
    if platform == "gpu":
        first = index * devices_per_process
        return {"JAX_PLATFORMS": "cuda",
                "CUDA_VISIBLE_DEVICES": ",".join(str(first + i) for i in range(devices_per_process))}
    raise ValueError(f"--platform={platform!r}: use 'cpu' (simulated devices) or 'gpu'.")


def commands(num_processes: int, devices_per_process: int, binary_args: Sequence[str], module: str = "olmax.train",
             port: int = 8476, platform: str = "cpu", python: str = sys.executable,
             base_env: dict | None = None) -> list[tuple[dict[str, str], list[str]]]:
    """[(extra environment, argv)] for each process, in process order."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("--num_processes and --devices_per_process must be >= 1.")
    clash = [a for a in binary_args if a.split("=")[0] in ("--coordinator_address", "--process_count", "--process_index")]
    if clash:
        raise ValueError(f"{clash}: the launcher sets the multi-host flags itself; leave them out.")
    out = []
    for i in range(num_processes):
        argv = [python, "-m", module, *binary_args,
                f"--coordinator_address=127.0.0.1:{port}", f"--process_count={num_processes}", f"--process_index={i}"]
        out.append((process_env(i, devices_per_process, platform, base_env), argv))
    return out


def describe(cmds: list[tuple[dict[str, str], list[str]]]) -> str:
    """The commands as shell lines (what --dry_run prints)."""
    lines = []
    for env, argv in cmds:
        lines.append(" ".join(f"{k}={shell_join([v])}" for k, v in sorted(env.items())) + " " + shell_join(argv) + " &")
    lines.append("wait")
    return "\n".join(lines)


def _pump(index: int, stream, log_path: str | None, lock: threading.Lock, muted: set[int]) -> None:
    log = open(log_path, "w") if log_path else None
    try:
        for line in iter(stream.readline, ""):
            with lock:
                if index not in muted:
                    sys.stdout.write(f"[{index}] {line}")
                    sys.stdout.flush()
            if log:
                log.write(line)
                log.flush()
    finally:
        if log:
            log.close()


def run(cmds: list[tuple[dict[str, str], list[str]]], log_dir: str | None = None, cwd: str | None = None,
        grace_s: float = 30.0) -> int:
    """Starts every process, streams their output, returns the first non-zero exit status (else 0)."""
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    lock = threading.Lock()
    muted: set[int] = set()  # processes stopped because another failed: their errors are echoes of that one
    procs, pumps = [], []
    for i, (env, argv) in enumerate(cmds):
        p = subprocess.Popen(argv, env=dict(os.environ, **env), cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
        procs.append(p)
        with lock:
            print(f"[launch.local] process {i}: pid {p.pid}", flush=True)
        t = threading.Thread(target=_pump, daemon=True,
                             args=(i, p.stdout, os.path.join(log_dir, f"process_{i}.log") if log_dir else None, lock,
                                   muted))
        t.start()
        pumps.append(t)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    try:
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: nothing to forward
        previous = {}
    first_failure, failed = 0, None
    try:
        remaining = set(range(len(procs)))
        while remaining:
            for i in sorted(remaining):
                try:
                    rc = procs[i].wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                remaining.discard(i)
                if rc != 0 and not first_failure:
                    first_failure, failed = rc, i
                    with lock:
                        muted.update(remaining)
                        print(f"[launch.local] process {i} exited with status {rc}; stopping the others.", flush=True)
                    _stop([procs[j] for j in remaining], grace_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(timeout=5)
    if failed is not None:
        where = f"; their last output is in {log_dir}" if log_dir else ""
        print(f"[launch.local] process {failed} failed (exit status {first_failure}, its error is above); the other "
              f"processes were stopped{where}.", flush=True)
    return first_failure


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM (the trainer checkpoints and exits), then SIGKILL after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv: Sequence[str] | None = None) -> int:
    own, binary_args = split_argv(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after `--` go to the binary unchanged.")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="simulated CPU devices (cpu) or GPUs (gpu) per process")
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--module", default="olmax.train", help="olmax.train, olmax.eval or olmax.infer")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--log_dir", default=None, help="also write each process's output to LOG_DIR/process_I.log")
    parser.add_argument("--dry_run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(own)
    if not binary_args:
        parser.error("give the binary's arguments after `--`, e.g. -- --gin_file=gin/quickstart.gin")
    for name in ("num_processes", "devices_per_process"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: give at least 1")
    try:
        cmds = commands(args.num_processes, args.devices_per_process, binary_args, args.module,
                        args.port or free_port(), args.platform)
    except ValueError as e:  # the binary's arguments: usage errors, as argparse reports its own
        parser.error(str(e))
    if args.dry_run:
        print(describe(cmds))
        return 0
    return run(cmds, args.log_dir)


if __name__ == "__main__":
    sys.exit(main())
