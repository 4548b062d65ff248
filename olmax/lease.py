"""One live trainer per MODEL_DIR: a lease file held by the chief process.

Two trainers writing one MODEL_DIR (a pod job relaunched while the old one still
runs, a command pasted twice) overwrite each other's checkpoints and mix their
TensorBoard events, and both exit 0. So the chief process (process 0) of a run
writes MODEL_DIR/lease.json, naming its owner, host, pid, start and a heartbeat it
refreshes every HEARTBEAT_S seconds, and removes it when the run ends. A second
trainer that finds a live lease stops with one line naming the holder and the
way to take over:

  * the holder's process is gone and it ran on this host (kill -9, an OOM kill):
    the lease is taken over at once, with a warning, so a rerun resumes as before;
  * its heartbeat is older than STALE_S (a host lost, a process on another machine):
    taken over, with a warning;
  * `--force`: taken over whatever it says; the old trainer finds at its next step
    that the lease is no longer its own and stops without saving.

The file is read and written with tf.io.gfile, so MODEL_DIR may be a bucket
(gs://...), where there are no POSIX locks. Two trainers that start at the same
moment may both find no lease and both write one: the last write wins, so each
reads the lease back after a short pause and the one that finds another's run id
there stops. Only process 0 takes the lease: a pod's workers share one run and
never refuse each other.
"""
from __future__ import annotations

import dataclasses
import getpass
import json
import os
import socket
import threading
import time
import uuid

import tensorflow as tf
from absl import logging

LEASE_FILE = "lease.json"
HEARTBEAT_S = 60.0
STALE_S = 600.0  # ten missed heartbeats: the holder is gone


class LeaseHeldError(ValueError):
    """MODEL_DIR belongs to another live trainer."""


class LeaseLostError(ValueError):
    """Another trainer took this run's MODEL_DIR over (--force)."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """What a lease says about the trainer that holds it."""

    run_id: str
    owner: str
    host: str
    pid: int
    start: float
    heartbeat: float

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start))
        return (f"{self.owner}@{self.host} pid {self.pid}, started {started}, last heartbeat "
                f"{_age(now - self.heartbeat)} ago")


def _age(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001  no login name in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class Lease:
    """MODEL_DIR's lease, held by this process from `acquire()` to `release()`.

    Args:
      model_dir: MODEL_DIR, a local path or a gfile URL (gs://...).
      force: take the lease over even from a live holder.
      heartbeat_s, stale_s: how often the heartbeat is written; how old it must be
        for a holder on another host to count as gone.
      settle_s: the pause before reading the lease back (see the module docstring);
        longer on a bucket, whose writes take longer than a local rename.
    """

    def __init__(self, model_dir: str, force: bool = False, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S, settle_s: float | None = None):
        self.model_dir, self.force = os.fspath(model_dir), force
        self.path = os.path.join(self.model_dir, LEASE_FILE)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.settle_s = settle_s if settle_s is not None else (1.0 if "://" in self.model_dir else 0.1)
        now = time.time()
        self.me = Holder(uuid.uuid4().hex, _user(), socket.gethostname(), os.getpid(), now, now)
        self.lost_to: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> Holder | None:
        """The lease's holder, or None when there is no lease (or an unreadable one, left by a
        process killed mid-write: it holds nothing)."""
        try:
            with tf.io.gfile.GFile(self.path, "r") as f:
                return Holder(**json.loads(f.read()))
        except tf.errors.NotFoundError:
            return None
        except (ValueError, TypeError) as e:
            logging.warning("Ignoring the unreadable lease %s (%s).", self.path, e)
            return None

    def _write(self, holder: Holder) -> None:
        tmp = f"{self.path}.{holder.run_id}.tmp"
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write(json.dumps(dataclasses.asdict(holder)))
        tf.io.gfile.rename(tmp, self.path, overwrite=True)  # readers never see half a lease

    def _takeover_reason(self, holder: Holder, now: float) -> str | None:
        """Why `holder` no longer holds MODEL_DIR, or None while it may be alive."""
        if holder.host == self.me.host and not _process_alive(holder.pid):
            return f"its process {holder.pid} is gone"
        if now - holder.heartbeat > self.stale_s:
            return f"its heartbeat is {_age(now - holder.heartbeat)} old"
        if self.force:
            return "--force"
        return None

    def acquire(self) -> None:
        """Takes the lease or raises LeaseHeldError naming its holder and how to take over."""
        holder, now = self.read(), time.time()
        if holder is not None and holder.run_id != self.me.run_id:
            reason = self._takeover_reason(holder, now)
            if reason is None:
                raise self._held_error(holder, now)
            logging.warning("Taking over MODEL_DIR %s from the trainer %s (%s).", self.model_dir,
                            holder.describe(now), reason)
        tf.io.gfile.makedirs(self.model_dir)
        self._write(self.me)
        time.sleep(self.settle_s)
        winner = self.read()
        if winner is not None and winner.run_id != self.me.run_id:  # another trainer started at the same moment
            raise self._held_error(winner, time.time())
        self._thread = threading.Thread(target=self._beat, name="olmax-lease-heartbeat", daemon=True)
        self._thread.start()

    def _held_error(self, holder: Holder, now: float) -> LeaseHeldError:
        return LeaseHeldError(
            f"MODEL_DIR {self.model_dir} is in use by another trainer ({holder.describe(now)}); use another MODEL_DIR, "
            f"stop that trainer, or take over with --force (without it, once its heartbeat is "
            f"{_age(self.stale_s)} old). The lease is {self.path}."
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self.read()
                if holder is not None and holder.run_id != self.me.run_id:
                    self.lost_to = holder
                    return
                self._write(dataclasses.replace(self.me, heartbeat=time.time()))
            except Exception as e:  # noqa: BLE001  a bucket's passing error: the next beat retries
                logging.warning("Could not refresh the lease %s: %s", self.path, e)

    def check(self) -> None:
        """Raises LeaseLostError once the heartbeat found another trainer's lease in MODEL_DIR."""
        if self.lost_to is not None:
            raise LeaseLostError(
                f"MODEL_DIR {self.model_dir} was taken over by another trainer ({self.lost_to.describe(time.time())}); "
                "this run stops without saving, so as not to overwrite that trainer's checkpoints."
            )

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if it is still this run's."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        try:
            holder = self.read()
            if holder is not None and holder.run_id == self.me.run_id:
                tf.io.gfile.remove(self.path)
        except Exception as e:  # noqa: BLE001  the run itself is over; a left lease is taken over later
            logging.warning("Could not remove the lease %s: %s", self.path, e)


def take(model_dir: str, force: bool = False) -> Lease:
    """MODEL_DIR's lease for this run: process 0 acquires it; every process learns whether it did
    (a collective), so a refused pod stops on every host, not only on the chief. The other
    processes get a Lease they never acquire (check and release do nothing)."""
    from olmax import multihost

    run_lease, error = Lease(model_dir, force), None
    if multihost.is_main_process():
        try:
            run_lease.acquire()
        except LeaseHeldError as e:
            error = e
    if not multihost.all_processes(error is None):
        raise error or LeaseHeldError(f"Process 0 could not take the lease of MODEL_DIR {model_dir} (see its "
                                      "message): another trainer holds it.")
    return run_lease
