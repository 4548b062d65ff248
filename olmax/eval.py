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

from olmax import checkpoints, gin_utils, models, multihost, partitioning, trainer, utils, validation

if __name__ == "__main__":
    gin_utils.run_importable_module("olmax.eval")


def _seqio_evaluate(model: models.DecoderOnlyLM, params, cfg: utils.DatasetConfig, step: int, output_dir: str,
                    score_step, max_decode_length: int | None = None) -> dict:
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
            out.extend(zip(index.tolist(), np.asarray(score_step(params, batch)).tolist()))
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
    trainer.check_batch(dataset_cfg.batch_size, partitioner)
    utils.check_lengths(dataset_cfg, model.config.max_length)
    validation.integer(eval_steps, "eval.evaluate.eval_steps", minimum=1, example=20, allow_none=True)
    path = trainer.checkpoint_path(restore_checkpoint_cfg, model_dir)
    setting = trainer.checkpoint_setting(restore_checkpoint_cfg)
    directory, groups = trainer.checkpoint_candidates(path, restore_checkpoint_cfg, setting)
    output_dir = validation.output_dir(output_dir, "EVAL_OUTPUT_DIR", directory, "eval")
    setup = trainer.TrainSetup(model, partitioner, (dataset_cfg.batch_size, dataset_cfg.task_feature_lengths["targets"]))
    trainer.check_memory(setup)
    compiled = trainer.make_steps(setup)
    is_main = multihost.is_main_process()
    every = restore_checkpoint_cfg.mode == "all"
    writer = None  # created with the first readable checkpoint: nothing is left behind when none is
    results = []
    for candidates in groups:
        try:
            step, params = trainer.load_params(
                setup, directory, candidates,
                "skipping it" if every else trainer.when_none_left(path, restore_checkpoint_cfg, setting))
        except checkpoints.NoReadableCheckpointError:
            if every:
                continue
            raise
        if writer is None:
            os.makedirs(output_dir, exist_ok=True)
            writer = trainer.metric_writer(output_dir, "eval")
        metrics = trainer.evaluate(params, dataset_cfg, partitioner, eval_steps, compiled.eval)
        if run_seqio_evaluator:
            metrics.update(_seqio_evaluate(model, params, dataset_cfg, step, output_dir, compiled.score))
        record = {"step": step, "checkpoint": trainer.checkpoint_dir(directory, step),
                  "task": dataset_cfg.mixture_or_task_name, "split": dataset_cfg.split, **metrics}
        results.append(record)
        if is_main:
            writer.write_scalars(step, metrics)
            with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        logging.info("eval %s: %s", record["checkpoint"], trainer.fmt_metrics(metrics))
        print(json.dumps(record), flush=True)
    if writer is None:
        raise checkpoints.NoReadableCheckpointError(
            f"None of the checkpoints in {directory} is readable (see the warnings above); nothing was evaluated.")
    writer.flush()
    return results


def console_main():
    gin_utils.run_binary(evaluate, run_file="runs/eval.gin")
