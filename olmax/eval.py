r"""Evaluate checkpoints: `python -m olmax.eval --gin_file=<model or experiment> [--gin.KEY=VALUE ...]`.

    python -m olmax.eval --gin_file=gin/quickstart.gin            # the latest in runs/quickstart
    python -m olmax.eval --gin_file=gin/quickstart.gin --gin.CHECKPOINT_PATH="'runs/quickstart/200'"

gin/runs/eval.gin is read first (it binds `evaluate`), then the given files.

CHECKPOINT_PATH is one checkpoint (`<model_dir>/<step>`) or a directory of them;
`RestoreCheckpointConfig.mode = 'all'` evaluates every checkpoint in it, in order.
For each: validation loss, accuracy, perplexity, bits per token (and bits per byte
for byte vocabularies), token-weighted over the split, written as one jsonl line
to EVAL_OUTPUT_DIR/metrics.jsonl and to TensorBoard (EVAL_OUTPUT_DIR/eval). Tasks
that define metric functions are also run through `seqio.Evaluator` (predictions
by cached decoding, scores by `score_batch`), as in T5X.
"""
from __future__ import annotations

import json
import os

import gin
import jax
import numpy as np
import seqio
from absl import logging
from clu import metric_writers

from olmax import checkpoints, gin_utils, models, partitioning, t5x_checkpoints, train, utils


def checkpoint_steps(path: str, cfg: utils.RestoreCheckpointConfig) -> tuple[str, list[int]]:
    """(directory of checkpoints, the steps to evaluate) for CHECKPOINT_PATH.

    Olmax's `<model_dir>/<step>` and T5X's `<model_dir>/checkpoint_<step>` layouts
    both work (see olmax.t5x_checkpoints).
    """
    path = os.path.normpath(os.fspath(path))
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), [int(base)]
    if t5x_checkpoints.step_of(path) is not None:
        return os.path.dirname(path), [t5x_checkpoints.step_of(path)]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CHECKPOINT_PATH={path!r} does not exist; point it at a MODEL_DIR or a MODEL_DIR/<step>.")
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d, "state")))
    steps = steps or t5x_checkpoints.steps(path)
    if not steps:
        raise FileNotFoundError(f"No checkpoints (numbered step directories) in CHECKPOINT_PATH={path!r}.")
    if cfg.mode == "all":
        return path, steps
    if cfg.mode == "specific" and cfg.step is not None:
        if cfg.step not in steps:
            raise FileNotFoundError(f"No checkpoint for step {cfg.step} in {path!r}; it has {steps}.")
        return path, [cfg.step]
    return path, [steps[-1]]


def checkpoint_dir(directory: str, step: int) -> str:
    """Olmax's `<directory>/<step>`, or T5X's `<directory>/checkpoint_<step>` when only that exists."""
    olmax_dir, t5x_dir = os.path.join(directory, str(step)), t5x_checkpoints.step_dir(directory, step)
    return t5x_dir if not os.path.isdir(olmax_dir) and os.path.isdir(t5x_dir) else olmax_dir


def load_params(setup: train.TrainSetup, directory: str, step: int):
    """Restores only the parameters of the checkpoint at `step` (Olmax's or T5X's layout)."""
    abstract = checkpoints.abstract_like(setup.param_shapes, setup.param_shardings)
    path = checkpoint_dir(directory, step)
    if t5x_checkpoints.step_of(path) is not None:
        return t5x_checkpoints.read_params(path, abstract)
    ckpt = checkpoints.Checkpointer(directory, None, train.run_meta(setup.model, setup.param_shapes))
    state, _ = ckpt.restore(step, {"params": abstract}, partial=True)
    return state["params"]


def _seqio_evaluate(model: models.DecoderOnlyLM, params, cfg: utils.DatasetConfig, step: int, output_dir: str,
                    max_decode_length: int | None = None) -> dict:
    """Inference metrics of tasks that define metric functions (seqio.Evaluator)."""
    task = utils.get_task(cfg)
    tasks = [task] if isinstance(task, seqio.Task) else list(task.tasks)
    if not any(t.metric_fns for t in tasks):
        return {}
    evaluator = seqio.Evaluator(
        cfg.mixture_or_task_name,
        feature_converter=seqio.DecoderFeatureConverter(pack=False),
        eval_split=cfg.split,
        use_cached=cfg.use_cached,
        sequence_length=dict(cfg.task_feature_lengths),
        log_dir=output_dir,
        logger_cls=[seqio.JSONLogger],
    )

    def batched(ds):
        for batch in ds.batch(cfg.batch_size).as_numpy_iterator():
            index, features = batch
            yield np.asarray(index), {k: np.asarray(v) for k, v in features.items()}

    def predict_fn(ds):
        out = []
        for index, batch in batched(ds):
            tokens, _ = model.predict_batch_with_aux(params, batch, jax.random.PRNGKey(0),
                                                     max_decode_length=max_decode_length)
            out.extend(zip(index.tolist(), np.asarray(tokens).tolist()))
        return out

    def score_fn(ds):
        out = []
        for index, batch in batched(ds):
            out.extend(zip(index.tolist(), np.asarray(model.score_batch(params, batch)).tolist()))
        return out

    all_metrics, _ = evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn, score_fn=score_fn)
    return {f"{task}/{name}": float(v) for task, metrics in all_metrics.result().items() for name, v in metrics.items()
            if np.isscalar(v) or np.ndim(v) == 0}


@gin.configurable
def evaluate(
    *,
    model: models.DecoderOnlyLM,
    dataset_cfg: utils.DatasetConfig,
    restore_checkpoint_cfg: utils.RestoreCheckpointConfig,
    output_dir: str | None = None,
    model_dir: str | None = None,
    partitioner: partitioning.PjitPartitioner | None = None,
    eval_steps: int | None = None,
    run_seqio_evaluator: bool = True,
) -> list[dict]:
    """Evaluates the selected checkpoints; returns one metrics dict per checkpoint."""
    partitioner = partitioner or partitioning.PjitPartitioner()
    partitioner.check_batch_size(dataset_cfg.batch_size)
    utils.check_lengths(dataset_cfg, model.config.max_length)
    path = restore_checkpoint_cfg.path or model_dir
    if not path:
        raise ValueError("Set CHECKPOINT_PATH (a MODEL_DIR or a MODEL_DIR/<step>) or MODEL_DIR to evaluate.")
    directory, steps = checkpoint_steps(path, restore_checkpoint_cfg)
    output_dir = output_dir or os.path.join(directory, "eval")
    length = dataset_cfg.task_feature_lengths["targets"]
    setup = train.TrainSetup(model, partitioner, (dataset_cfg.batch_size, length))
    eval_fn = jax.jit(lambda p, b: model.loss_fn(p, b, None)[1],
                      in_shardings=(setup.param_shardings, partitioner.data_sharding))
    is_main = jax.process_index() == 0
    os.makedirs(output_dir, exist_ok=True)
    writer = metric_writers.create_default_writer(output_dir, just_logging=not is_main, collection="eval")
    results = []
    for step in steps:
        params = load_params(setup, directory, step)
        metrics = train.evaluate(model, params, dataset_cfg, partitioner, eval_steps, eval_fn)
        if run_seqio_evaluator:
            metrics.update(_seqio_evaluate(model, params, dataset_cfg, step, output_dir))
        record = {"step": step, "checkpoint": checkpoint_dir(directory, step),
                  "task": dataset_cfg.mixture_or_task_name, "split": dataset_cfg.split, **metrics}
        results.append(record)
        if is_main:
            writer.write_scalars(step, metrics)
            with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        logging.info("eval %s: %s", record["checkpoint"], train._fmt_metrics(metrics))
        print(json.dumps(record), flush=True)
    writer.flush()
    return results


def main(argv):
    del argv
    from olmax import multihost

    multihost.initialize_from_flags()
    gin_utils.parse_from_flags(run_file="runs/eval.gin")
    evaluate()


def console_main():
    gin_utils.run(main)


if __name__ == "__main__":
    from olmax import eval as _eval

    _eval.console_main()
