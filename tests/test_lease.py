"""MODEL_DIR's lease (issue 23): one live trainer per run directory, on a local disk and on a
filesystem without POSIX locks (TensorFlow's ram://, standing in for a bucket)."""
import dataclasses
import subprocess
import sys
import time
import uuid

import pytest

from olmax import lease


@pytest.fixture(params=["local", "ram"])
def model_dir(request, tmp_path):
    return str(tmp_path / "run") if request.param == "local" else f"ram://olmax-lease-{uuid.uuid4().hex}/run"


def other_trainer(model_dir, **changes) -> lease.Lease:
    """A lease written as another trainer would have written it."""
    import tensorflow as tf

    tf.io.gfile.makedirs(model_dir)
    theirs = lease.Lease(model_dir)
    theirs._write(dataclasses.replace(theirs.me, **changes))
    return theirs


def test_a_second_trainer_is_refused_naming_the_holder_and_how_to_take_over(model_dir):
    first = lease.Lease(model_dir)
    first.acquire()
    try:
        with pytest.raises(lease.LeaseHeldError) as e:
            lease.Lease(model_dir).acquire()
        message = str(e.value)
        assert message.startswith(f"MODEL_DIR {model_dir} is in use by another trainer ({first.me.owner}@"
                                  f"{first.me.host} pid {first.me.pid}, started ")
        assert "take over with --force" in message and "once its heartbeat is 10 min old" in message
        assert "\n" not in message
    finally:
        first.release()
    assert first.read() is None  # released: the next trainer starts without a word
    second = lease.Lease(model_dir)
    second.acquire()
    second.release()


def test_a_lease_left_by_kill_9_on_this_host_is_taken_over_at_once(model_dir, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other_trainer(model_dir, pid=int(gone.stdout))
    mine = lease.Lease(model_dir)
    with caplog.at_level("WARNING"):
        mine.acquire()
    mine.release()
    assert f"(its process {int(gone.stdout)} is gone)" in caplog.text


def test_a_lease_from_another_host_holds_until_its_heartbeat_is_stale(model_dir, caplog):
    other_trainer(model_dir, host="worker-7", pid=1)
    with pytest.raises(lease.LeaseHeldError, match=r"in use by another trainer \(.*@worker-7 pid 1"):
        lease.Lease(model_dir).acquire()
    other_trainer(model_dir, host="worker-7", pid=1, heartbeat=time.time() - lease.STALE_S - 60)
    mine = lease.Lease(model_dir)
    with caplog.at_level("WARNING"):
        mine.acquire()
    mine.release()
    assert "from the trainer" in caplog.text and "@worker-7 pid 1" in caplog.text and "min old)" in caplog.text


def test_force_takes_over_and_the_old_trainer_stops_at_its_next_heartbeat(model_dir):
    old = lease.Lease(model_dir, heartbeat_s=0.05)
    old.acquire()
    new = lease.Lease(model_dir, force=True)
    new.acquire()
    deadline = time.time() + 10
    while old.lost_to is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(lease.LeaseLostError, match=r"was taken over by another trainer .* stops without saving"):
        old.check()
    old.release()
    assert new.read().run_id == new.me.run_id  # the old trainer leaves the new one's lease alone
    new.release()


def test_the_heartbeat_is_refreshed(model_dir):
    mine = lease.Lease(model_dir, heartbeat_s=0.05)
    mine.acquire()
    time.sleep(0.5)
    assert mine.read().heartbeat > mine.me.heartbeat
    mine.release()


def test_of_two_trainers_starting_at_once_only_the_last_writer_goes_on(model_dir, monkeypatch):
    """Both found no lease and wrote one (no lock on a bucket): the read-back settles it."""
    first, second = lease.Lease(model_dir), lease.Lease(model_dir)
    monkeypatch.setattr(lease.time, "sleep", lambda s: second._write(second.me))  # second writes while first waits
    with pytest.raises(lease.LeaseHeldError, match=f"pid {second.me.pid}"):
        first.acquire()
    assert first.read().run_id == second.me.run_id


def test_an_unreadable_lease_holds_nothing(model_dir):
    import tensorflow as tf

    other_trainer(model_dir)
    with tf.io.gfile.GFile(f"{model_dir}/{lease.LEASE_FILE}", "w") as f:
        f.write('{"run_id": "abc", "ow')  # a process killed while writing it (before the rename)
    mine = lease.Lease(model_dir)
    mine.acquire()
    mine.release()


def test_pod_workers_do_not_refuse_each_other(model_dir, monkeypatch):
    """Only process 0 takes the lease; a worker's `take` neither reads nor writes it."""
    from olmax import multihost

    monkeypatch.setattr(multihost, "is_main_process", lambda: False)
    other_trainer(model_dir, host="worker-7", pid=1)  # would refuse a chief
    with lease.take(model_dir) as worker:
        worker.check()
