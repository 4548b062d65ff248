r"""Launch Olmax on Vertex AI with XManager, like T5X's t5x/scripts/xm_launch.py.

    python -m launch.xm_launch --accelerator=tpu_v3 --accelerator_count=8 \
        --model_dir=gs://my-bucket/olmax/small --tfds_data_dir=gs://my-bucket/tfds -- \
        --gin_file=gin/models/small.gin --gin_file=gin/runs/pretrain.gin \
        --gin.MIXTURE_OR_TASK_NAME="'c4_en_bytes'" --gin.TASK_FEATURE_LENGTHS="{'targets': 2048}" \
        --gin.TRAIN_STEPS=100000

(`xmanager launch launch/xm_launch.py -- ...` works too.) The job is one container
built from this checkout (`COPY` + `pip install -e ".[tpu]"` or ".[gpu]"), whose
entrypoint is `python3 -m olmax.train`; the arguments after `--`, and any `--gin*`
flag given before it (T5X style), are forwarded unchanged, plus --gin.MODEL_DIR
and --tfds_data_dir from the flags of the same names. `--dry_run` prints the job
spec as JSON and needs neither xmanager nor Google Cloud credentials; a real launch
needs `pip install xmanager` (the `launch` extra) and `gcloud auth`.

xmanager's Vertex executor (xmanager 0.8) maps TPU v2 and v3 and the GPU types;
for TPU v4/v5/v6 pod slices use launch/tpu_vm.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from launch import shell_join, split_argv, tpu_vm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# xm.JobRequirements keyword -> the pip extra with that platform's jax.
ACCELERATORS = {"tpu_v2": "tpu", "tpu_v3": "tpu", "v100": "gpu", "p100": "gpu", "t4": "gpu", "a100": "gpu",
                "l4": "gpu", "h100": "gpu"}
BASE_IMAGE = "gcr.io/deeplearning-platform-release/base-cpu"


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher flags, forwarded flags): `--gin*` flags and everything after `--` are forwarded."""
    own, after = split_argv(argv)
    gin = [a for a in own if a.startswith("--gin")]
    return [a for a in own if not a.startswith("--gin")], gin + after


def job_spec(args: argparse.Namespace, forwarded: Sequence[str]) -> dict[str, Any]:
    """Everything the launch needs, as plain data (what --dry_run prints)."""
    if args.accelerator not in ACCELERATORS:
        raise ValueError(f"--accelerator={args.accelerator!r}: use one of {sorted(ACCELERATORS)} "
                         "(TPU v4 and later: launch/tpu_vm.py).")
    job_args = list(forwarded)
    if args.model_dir:
        job_args.append(f"--gin.MODEL_DIR='{args.model_dir}'")
    if args.tfds_data_dir:
        job_args.append(f"--tfds_data_dir={args.tfds_data_dir}")
    if not any(a.startswith("--gin_file") for a in job_args):
        raise ValueError("No --gin_file to forward: give the training command's flags after `--`.")
    if not any(a.startswith(("--gin.MODEL_DIR", "--gin_bindings=MODEL_DIR")) for a in job_args):
        raise ValueError("Set --model_dir=gs://... (or --gin.MODEL_DIR): the job's container has no other place to keep checkpoints.")
    for key, value in tpu_vm.directory_settings(job_args).items():
        if "://" not in value and not value.startswith("/gcs/"):
            raise ValueError(f"{key}={value!r} is on the job container's disk, which is gone when the job ends. "
                             f"Use a bucket: gs://my-bucket/{key.lower()} (or /gcs/my-bucket/..., Vertex's mount of it).")
    extra = ACCELERATORS[args.accelerator]
    name = os.path.basename(REPO)
    return {
        "experiment_title": args.name,
        "executor": "xm_local.Vertex",
        "requirements": {args.accelerator: args.accelerator_count},
        "path": REPO,
        "base_image": args.base_image,
        "docker_instructions": [
            f"COPY {name}/ olmax",
            "WORKDIR olmax",
            f'RUN python3 -m pip install -e ".[{extra}]"',
        ],
        "entrypoint": [f"python3 -m {args.module}"],
        "args": job_args,
        "command": shell_join(["python3", "-m", args.module, *job_args]),
    }


def build(spec: dict[str, Any]):
    """(executor, packageable, args): the xmanager objects for `spec` (imports xmanager)."""
    try:
        from xmanager import xm, xm_local
    except ImportError as e:
        raise SystemExit(f"The XManager launcher needs xmanager ({e}): pip install xmanager "
                         "(or pip install -e '.[launch]'); --dry_run works without it.") from None
    executor = xm_local.Vertex(requirements=xm.JobRequirements(**spec["requirements"]))
    packageable = xm.python_container(
        executor.Spec(),
        path=spec["path"],
        base_image=spec["base_image"],
        docker_instructions=spec["docker_instructions"],
        entrypoint=xm.CommandList(spec["entrypoint"]),
    )
    return executor, packageable, spec["args"]


def launch(spec: dict[str, Any]) -> None:
    executor, packageable, job_args = build(spec)
    from xmanager import xm, xm_local

    @xm.run_in_asyncio_loop
    async def run():
        async with xm_local.create_experiment(experiment_title=spec["experiment_title"]) as experiment:
            [executable] = experiment.package([packageable])
            experiment.add(xm.Job(executable=executable, executor=executor, args=list(job_args)))

    run()


def main(argv: Sequence[str] | None = None) -> int:
    own, forwarded = split_gin_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m launch.xm_launch", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after `--` (and --gin* flags) go to the binary unchanged.")
    parser.add_argument("--name", default="olmax", help="experiment title")
    parser.add_argument("--accelerator", default="tpu_v3", help=f"one of {sorted(ACCELERATORS)}")
    parser.add_argument("--accelerator_count", type=int, default=8, help="TPU cores or GPUs")
    parser.add_argument("--model_dir", default=None, help="gs://... ; becomes --gin.MODEL_DIR")
    parser.add_argument("--tfds_data_dir", default=None, help="gs://... ; forwarded as --tfds_data_dir")
    parser.add_argument("--module", default="olmax.train", help="olmax.train, olmax.eval or olmax.infer")
    parser.add_argument("--base_image", default=BASE_IMAGE)
    parser.add_argument("--dry_run", action="store_true", help="print the job spec as JSON and exit")
    args = parser.parse_args(own)
    try:
        spec = job_spec(args, forwarded)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print(json.dumps(spec, indent=2))
        return 0
    launch(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
