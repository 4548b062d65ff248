r"""Sample from or score with a checkpoint: `python -m olmax.infer --gin_file=... [--prompt TEXT]`.

    python -m olmax.infer --gin_file=gin/quickstart.gin --prompt "def main("
    python -m olmax.infer --gin_file=gin/quickstart.gin --gin.INFER_MODE="'score'"

gin/runs/infer.gin is read first (it binds `infer`), then the given files.
With --prompt: the continuation of TEXT is printed (cached decoding; temperature,
top-k, top-p from Gin). Without: the examples of the task's split are decoded
(`predict`: the first `prompt_length` tokens of each example are the prompt, or
the `inputs` of a prefix-LM task) or scored (`score`: log-likelihood of each
example's targets, given its `inputs` for a prefix-LM task), one JSON object per
line in INFER_OUTPUT_DIR/<task>-<mode>.jsonl, as T5X's infer writes them.
"""
from __future__ import annotations

import dataclasses
import json
import os

import gin
import jax
import numpy as np
from absl import flags, logging

from olmax import decoding, gin_utils, models, multihost, partitioning, trainer, utils, validation

if __name__ == "__main__":
    gin_utils.run_importable_module("olmax.infer")


def _define_flags() -> None:
    if "prompt" not in flags.FLAGS:
        flags.DEFINE_string("prompt", None, "Print a continuation of this text instead of running on a dataset.")
        flags.DEFINE_integer("num_samples", 1, "With --prompt: how many continuations to sample.")


def _decode(vocabulary, tokens) -> str:
    ids = [int(t) for t in tokens]
    if 1 in ids:  # EOS ends the text
        ids = ids[: ids.index(1)]
    ids = [i for i in ids if i > 1]
    return vocabulary.decode(ids)


def _encode_prompt(vocabulary, text: str, max_length: int) -> np.ndarray:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise ValueError(f"--prompt is not UTF-8 text (a byte that is not UTF-8 at character {e.start}); "
                         "give the prompt in UTF-8, e.g. convert it with iconv -t utf-8.") from None
    ids = list(vocabulary.encode(text))
    if not ids:
        raise ValueError("The prompt encodes to no tokens; give some text.")
    if len(ids) + 1 >= max_length:
        raise ValueError(f"The prompt is {len(ids)} tokens; the model's max_length is {max_length}. Shorten it.")
    return np.asarray([0] + ids, np.int32)  # BOS (0) first, as in training's decoder inputs


@gin.configurable
def infer(
    *,
    model: models.DecoderOnlyLM,
    dataset_cfg: utils.DatasetConfig,
    restore_checkpoint_cfg: utils.RestoreCheckpointConfig,
    output_dir: str | None = None,
    model_dir: str | None = None,
    partitioner: partitioning.PjitPartitioner | None = None,
    mode: str = "predict",
    max_examples: int | None = 64,
    prompt_length: int = 32,
    max_decode_length: int = 128,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    random_seed: int = 0,
    prompt: str | None = None,
    num_samples: int = 1,
) -> str | list[str]:
    """Runs `mode` over the dataset (returns the jsonl path) or continues `prompt`
    (returns the `num_samples` continuations, also printed)."""
    validation.check_infer_args(num_samples=num_samples, max_examples=max_examples, prompt_length=prompt_length,
                                max_decode_length=max_decode_length, temperature=temperature, top_k=top_k, top_p=top_p)
    if mode not in ("predict", "score"):
        raise ValueError(f"INFER_MODE={mode!r} is not 'predict' or 'score'.")
    if model.vocabulary is None:
        raise ValueError("The model has no vocabulary; set models.DecoderOnlyLM.vocabulary in the model gin file.")
    partitioner = partitioner or partitioning.PjitPartitioner()
    single = dataclasses.replace(restore_checkpoint_cfg, mode="latest" if restore_checkpoint_cfg.mode == "all"
                                 else restore_checkpoint_cfg.mode)  # infer reads one checkpoint
    # The prompt before the checkpoint: a prompt that cannot be encoded costs no restore.
    tokens = _encode_prompt(model.vocabulary, prompt, model.config.max_length) if prompt is not None else None
    path = trainer.checkpoint_path(restore_checkpoint_cfg, model_dir)
    setting = trainer.checkpoint_setting(restore_checkpoint_cfg)
    directory, (candidates,) = trainer.checkpoint_candidates(path, single, setting)
    if prompt is None:
        output_dir = validation.output_dir(output_dir, "INFER_OUTPUT_DIR", directory, "infer")
    setup = trainer.TrainSetup(model, partitioner, (1, model.config.max_length))
    trainer.check_memory(setup)
    step, params = trainer.load_params(setup, directory, candidates, trainer.when_none_left(path, single, setting))
    vocab = model.vocabulary
    rng = jax.random.PRNGKey(random_seed)
    sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, eos_id=1)

    if prompt is not None:
        batch = np.repeat(tokens[None], num_samples, axis=0)
        new = min(max_decode_length, model.config.max_length - len(tokens) + 1)
        out = decoding.generate(model, params, batch, np.full(num_samples, len(tokens)), rng, new, **sample_kw)
        texts = [_decode(vocab, row) for row in np.asarray(out)]
        if multihost.is_main_process():
            for t in texts:
                print(prompt + t, flush=True)
        return texts

    os.makedirs(output_dir, exist_ok=True)
    out_path = os.path.join(output_dir, f"{dataset_cfg.mixture_or_task_name}-{mode}-{step}.jsonl")
    ds = utils.get_task(dataset_cfg).get_dataset(
        dict(dataset_cfg.task_feature_lengths), split=dataset_cfg.split, shuffle=False, num_epochs=1,
        use_cached=dataset_cfg.use_cached)
    import seqio

    ds = seqio.DecoderFeatureConverter(pack=False)(ds, dict(dataset_cfg.task_feature_lengths))
    ds = ds.take(max_examples) if max_examples else ds
    score_fn = trainer.make_steps(setup).score
    index = 0
    with open(out_path, "w") as f:
        for batch in ds.batch(dataset_cfg.batch_size).as_numpy_iterator():
            batch = {k: np.asarray(v) for k, v in batch.items()}
            targets = batch["decoder_target_tokens"]
            prefix = batch.get("decoder_causal_attention")  # a prefix-LM task (inputs + targets): BOS + inputs
            if mode == "score":  # the log-likelihood of the targets given the inputs (loss weights)
                scores = np.asarray(score_fn(params, batch))
                if prefix is None:
                    rows = [{"targets": _decode(vocab, t), "score": float(s)} for t, s in zip(targets, scores)]
                else:
                    rows = [{"inputs": _decode(vocab, t[:n - 1]), "targets": _decode(vocab, t[n - 1:]), "score": float(s)}
                            for t, n, s in zip(targets, prefix.sum(-1), scores)]
            else:
                if prefix is not None:  # the inputs are the prompt
                    lengths = prefix.sum(-1)
                else:
                    lengths = np.minimum((targets > 0).sum(-1), prompt_length) + 1
                width = int(lengths.max())
                prompts = batch["decoder_input_tokens"][:, :width]
                new = min(max_decode_length, model.config.max_length - width + 1)
                rng, key = jax.random.split(rng)
                tokens = np.asarray(decoding.generate(model, params, prompts, lengths, key, new, **sample_kw))
                rows = []
                for p, n, t, g in zip(prompts, lengths, targets, tokens):
                    rows.append({"inputs": _decode(vocab, p[1:n]), "prediction": _decode(vocab, g),
                                 "targets": _decode(vocab, t[n - 1:])})
            for row in rows:
                f.write(json.dumps({"index": index, **row}) + "\n")
                index += 1
    logging.info("Wrote %d %s results to %s", index, mode, out_path)
    print(out_path, flush=True)
    return out_path


def console_main():
    _define_flags()
    fl = flags.FLAGS
    gin_utils.run_binary(lambda: infer() if fl.prompt is None else infer(prompt=fl.prompt, num_samples=fl.num_samples),
                         run_file="runs/infer.gin")
