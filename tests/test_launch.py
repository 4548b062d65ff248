"""The launchers' dry runs print exactly the commands / job spec they would run (no cloud, no xmanager)."""
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from launch import local, shell_join, tpu_vm, xm_launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN = ["--gin_file=gin/models/small.gin", "--gin.MODEL_DIR='gs://bucket/run 1'",
       "--gin.TASK_FEATURE_LENGTHS={'targets': 2048}", "--gin.TRAIN_STEPS=100"]


def _lines(capsys, main, argv):
    assert main(argv) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_shell_join_round_trips():
    args = ["a b", "--gin.X='y'", 'q"uote', "$HOME", "", "it's", "{'targets': 64}", "--command=cd ~ && x \"--gin.Y='z'\""]
    assert shlex.split(shell_join(args)) == args
    assert shell_join(["--gin.MODEL_DIR='runs/x'"]) == "\"--gin.MODEL_DIR='runs/x'\""


def test_local_dry_run(capsys, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS")  # the dry run prints the flags it adds to those of the calling shell
    lines = _lines(capsys, local.main, ["--num_processes", "2", "--devices_per_process", "2", "--port", "4321",
                                        "--dry_run", "--", *GIN])
    assert lines[-1] == "wait" and len(lines) == 3
    for i, line in enumerate(lines[:2]):
        words = shlex.split(line.rstrip(" &"))
        env = dict(w.split("=", 1) for w in words[:2])
        assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        assert words[2:5] == [sys.executable, "-m", "olmax.train"]
        assert words[5:9] == GIN  # forwarded unchanged
        assert words[9:] == ["--coordinator_address=127.0.0.1:4321", "--process_count=2", f"--process_index={i}"]


def test_local_environment_and_errors():
    env = local.process_env(1, 4, "cpu", {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert local.process_env(1, 2, "gpu", {})["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(ValueError, match="sets the multi-host flags itself"):
        local.commands(2, 1, ["--process_index=0"])


def test_local_runs_every_process_and_stops_the_rest_when_one_fails(capsys):
    ok = [({}, [sys.executable, "-c", f"print('hello from {i}')"]) for i in range(2)]
    assert local.run(ok) == 0
    out = capsys.readouterr().out
    assert "[0] hello from 0" in out and "[1] hello from 1" in out
    failing = [({}, [sys.executable, "-c", "import sys; sys.exit(3)"]),
               ({}, [sys.executable, "-c", "import time; time.sleep(60)"])]
    t = time.time()
    assert local.run(failing, grace_s=5) == 3
    assert time.time() - t < 30
    assert "process 0 exited with status 3; stopping the others" in capsys.readouterr().out


def test_local_keeps_the_failure_last_and_the_survivors_echoes_in_the_log(capsys, tmp_path):
    """Issue 23: the survivor's Gloo traceback followed the launcher's clear line."""
    survivor = ("import signal, sys, time\n"
                "def stop(*_):\n"
                "    print('Traceback (most recent call last): gloo connection closed by peer', flush=True)\n"
                "    sys.exit(1)\n"
                "signal.signal(signal.SIGTERM, stop)\n"
                "print('ready', flush=True)\n"
                "time.sleep(60)\n")
    cmds = [({}, [sys.executable, "-c", "import time, sys; time.sleep(2); print('bad input'); sys.exit(3)"]),
            ({}, [sys.executable, "-c", survivor])]
    assert local.run(cmds, log_dir=str(tmp_path), grace_s=10) == 3
    out = capsys.readouterr().out.strip().splitlines()
    assert "[0] bad input" in out and "Traceback" not in "\n".join(out)
    assert out[-1] == (f"[launch.local] process 0 failed (exit status 3, its error is above); the other processes were "
                       f"stopped; their last output is in {tmp_path}.")
    assert "gloo connection closed" in (tmp_path / "process_1.log").read_text()


@pytest.mark.parametrize("args, message", [
    (["--num_processes", "0"], "--num_processes=0: give at least 1"),
    (["--devices_per_process", "0"], "--devices_per_process=0: give at least 1"),
    (["--", "--gin_file=x.gin", "--process_index=1"], "['--process_index=1']: the launcher sets the multi-host flags "
                                                      "itself; leave them out."),
])
def test_local_usage_errors_are_argparse_errors(capsys, args, message):
    """Issue 23: ValueError tracebacks."""
    argv = args if "--" in args else args + ["--", "--gin_file=x.gin"]
    with pytest.raises(SystemExit) as e:
        local.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m launch.local: error: {message}"


def test_local_is_runnable_from_the_checkout():
    proc = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes", "3", "--dry_run", "--",
                           "--gin_file=gin/quickstart.gin"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--process_index=2" in proc.stdout and "--process_count=3" in proc.stdout


def _remote_argv(line):
    """The argv a worker runs, from a `gcloud ... ssh --command=...` line."""
    (command,) = [w[len("--command="):] for w in shlex.split(line) if w.startswith("--command=")]
    return command, shlex.split(command)


def test_tpu_vm_dry_run(capsys):
    lines = _lines(capsys, tpu_vm.main, ["--tpu", "olmax-pod", "--zone", "us-central2-b", "--project", "p1",
                                         "--accelerator_type", "v4-32", "--spot", "--dry_run", "--", *GIN])
    text = "\n".join(lines)
    assert lines[0].startswith("gcloud compute tpus tpu-vm describe olmax-pod") and "reuse" in lines[0]
    assert "gcloud compute tpus tpu-vm create olmax-pod --accelerator-type=v4-32" in lines[1] and "--spot" in lines[1]
    assert "git ls-files" in lines[2] and "tar czf" in lines[2]
    assert "tpu-vm scp /tmp/olmax-src.tar.gz olmax-pod:" in lines[3] and "--worker=all" in lines[3]
    assert "--worker=all" in lines[4] and 'pip install -q -e ".[tpu]"' in lines[4]
    command, argv = _remote_argv(lines[5])
    assert "--worker=all" in lines[5] and "--zone=us-central2-b" in lines[5] and "--project=p1" in lines[5]
    start = argv.index("python3")
    assert argv[start:start + 3 + len(GIN)] == ["python3", "-m", "olmax.train", *GIN]  # every worker, same command
    assert "--coordinator_address" not in text  # a TPU VM pod finds its processes itself


def test_tpu_vm_git_and_detach(capsys):
    lines = _lines(capsys, tpu_vm.main, ["--tpu", "t", "--zone", "z", "--git_url", "https://example.com/olmax.git",
                                         "--git_ref", "v1", "--detach", "--env", "TFDS_DATA_DIR=gs://b/tfds",
                                         "--dry_run", "--", *GIN])
    assert "git clone https://example.com/olmax.git ~/olmax-" in lines[2] and "checkout -q v1" in lines[2]
    command, argv = _remote_argv(lines[3])
    assert "nohup" in argv and "export TFDS_DATA_DIR=gs://b/tfds;" in command and "--worker=all" in lines[3]
    assert "--worker=0" in lines[4] and "tail" in lines[4]
    lines = _lines(capsys, tpu_vm.main, ["--tpu", "t", "--zone", "z", "--skip_install", "--dry_run", "--", *GIN])
    assert len(lines) == 3 and "olmax.train" in lines[2]


def test_xm_dry_run_spec(capsys):
    out = _lines(capsys, xm_launch.main, ["--accelerator=tpu_v3", "--accelerator_count=32", "--model_dir=gs://b/x",
                                          "--tfds_data_dir=gs://b/tfds", "--gin.RANDOM_SEED=3", "--dry_run", "--",
                                          *GIN[:1], *GIN[2:]])
    spec = json.loads("\n".join(out))
    assert spec["executor"] == "xm_local.Vertex" and spec["requirements"] == {"tpu_v3": 32}
    assert spec["entrypoint"] == ["python3 -m olmax.train"]
    assert spec["args"] == ["--gin.RANDOM_SEED=3", *GIN[:1], *GIN[2:], "--gin.MODEL_DIR='gs://b/x'",
                            "--tfds_data_dir=gs://b/tfds"]
    assert 'RUN python3 -m pip install -e ".[tpu]"' in spec["docker_instructions"]
    assert shlex.split(spec["command"]) == ["python3", "-m", "olmax.train", *spec["args"]]


def test_xm_errors(capsys):
    with pytest.raises(SystemExit):
        xm_launch.main(["--accelerator=tpu_v9", "--model_dir=gs://b", "--dry_run", "--", *GIN[:1]])
    assert "tpu_vm.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        xm_launch.main(["--dry_run", "--", *GIN[:1]])
    assert "--model_dir" in capsys.readouterr().err
    # A directory on the container's own disk is lost with the container: refused, with the fix.
    for model_dir, needle in (("runs/x", "MODEL_DIR='runs/x'"), ("/tmp/x", "gs://my-bucket/model_dir")):
        with pytest.raises(SystemExit):
            xm_launch.main(["--accelerator=tpu_v3", f"--model_dir={model_dir}", "--dry_run", "--", *GIN[:1]])
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        xm_launch.main(["--accelerator=tpu_v3", "--model_dir=gs://b/x", "--dry_run", "--", *GIN[:1],
                        "--gin.INFER_OUTPUT_DIR='out'"])
    assert "INFER_OUTPUT_DIR='out'" in capsys.readouterr().err
    spec = json.loads("\n".join(_lines(capsys, xm_launch.main, ["--accelerator=tpu_v3", "--model_dir=/gcs/b/x",
                                                                "--dry_run", "--", *GIN[:1]])))
    assert "--gin.MODEL_DIR='/gcs/b/x'" in spec["args"]


def test_tpu_vm_installs_into_a_fresh_directory_and_never_deletes(capsys):
    """Issue 13.7: a relaunch must not delete what a run may have written on the workers."""
    lines = _lines(capsys, tpu_vm.main, ["--tpu", "t", "--zone", "z", "--dry_run", "--", *GIN])
    text = "\n".join(lines)
    assert "rm " not in text and "rm -" not in text
    install, _ = _remote_argv(lines[4])
    fresh = install.split("&&")[0].split()
    assert fresh[0] == "mkdir" and len(fresh) == 2 and fresh[1].startswith("~/olmax-2")  # no -p: never reused
    assert f"ln -sfn {fresh[1]} ~/olmax-current" in install
    command, _ = _remote_argv(lines[5])
    assert command.startswith("cd ~/olmax-current && ")
    lines = _lines(capsys, tpu_vm.main, ["--tpu", "t", "--zone", "z", "--git_url", "u", "--dry_run", "--", *GIN])
    clone, _ = _remote_argv(lines[2])
    assert "rm " not in clone and clone.startswith("git clone u ~/olmax-2")


@pytest.mark.parametrize("model_dir, needle", [
    ("--gin.MODEL_DIR=runs/x", "MODEL_DIR='runs/x' is a relative path"),
    ("--gin.MODEL_DIR='/data/x'", "MODEL_DIR='/data/x' is a local path"),
    ("--gin_bindings=MODEL_DIR = 'runs/y'", "MODEL_DIR='runs/y' is a relative path"),
    ("--gin.TRAIN_STEPS=5", "MODEL_DIR is not set"),
])
def test_tpu_vm_refuses_a_model_dir_the_workers_cannot_share(capsys, model_dir, needle):
    argv = ["--tpu", "t", "--zone", "z", "--dry_run", "--", "--gin_file=gin/models/small.gin", model_dir]
    assert tpu_vm.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "gs://" in err and len(err.strip().splitlines()) == 1


def test_tpu_vm_model_dir_from_a_gin_file_and_the_escape_hatch(capsys, tmp_path):
    # gin/quickstart.gin sets MODEL_DIR = 'runs/quickstart': relative, refused.
    assert tpu_vm.main(["--tpu", "t", "--zone", "z", "--dry_run", "--", "--gin_file=gin/quickstart.gin"]) == 2
    assert "MODEL_DIR='runs/quickstart' is a relative path" in capsys.readouterr().err
    shared = ["--tpu", "t", "--zone", "z", "--dry_run", "--allow_local_model_dir", "--"]
    assert tpu_vm.main([*shared, "--gin_file=gin/quickstart.gin", "--gin.MODEL_DIR=/mnt/nfs/run"]) == 0
    assert tpu_vm.main([*shared, "--gin_file=gin/quickstart.gin", "--gin.MODEL_DIR=runs/x"]) == 2  # never relative
    ok = ["--tpu", "t", "--zone", "z", "--module", "olmax.eval", "--dry_run", "--", "--gin_file=gin/models/small.gin",
          "--gin.CHECKPOINT_PATH=gs://b/run/100"]
    assert tpu_vm.main(ok) == 0


def test_tpu_vm_refusal_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "launch.tpu_vm", "--tpu", "t", "--zone", "z", "--dry_run", "--",
                           "--gin_file=gin/quickstart.gin", "--gin.MODEL_DIR=runs/mine"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "python -m launch.tpu_vm: error: MODEL_DIR='runs/mine' is a relative path: on a pod it would be a different "
        "directory on each worker's disk. Use a bucket, e.g. --gin.MODEL_DIR=gs://my-bucket/run1.")
