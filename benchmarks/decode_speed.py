"""Decoding speed: cached incremental decoding vs recomputing the full sequence per token.

    python -m benchmarks.decode_speed            # lengths 256, 1024, 4096 -> benchmarks/results/decode_speed.md
    python -m benchmarks.decode_speed --lengths 256 1024   # the committed table (4096 takes long here)
    python -m benchmarks.decode_speed --quick    # tiny sizes, checks the output (CI smoke, < 30 s)

For each total length N (prompt N/2, the rest generated; mixer block K = sqrt(N)) and
each mixer (recall, axial, attention) on the same small model, one jitted function per path
runs init + prefill + a greedy loop whose number of steps is a runtime argument.
Per-step time = (time(n2 steps) - time(n1 steps)) / (n2 - n1), min over repeats, the
two paths alternating so that both see the same machine state. Both paths use fixed
shapes: the recompute step runs the full forward over the whole [batch, N] buffer
(what a jitted decoder without a cache does), so its cost does not depend on how
much of the buffer is filled yet.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from olmax import decoding, network

RESULTS = os.path.join(os.path.dirname(__file__), "results", "decode_speed.md")


def build(cfg: network.OlmaxConfig, max_steps: int, recompute: bool):
    """run(params, prompt, lengths, steps) -> tokens: olmax.decoding.generate, greedy, cache of the full
    length, at most `steps` new tokens (a traced value: one compilation serves every count)."""
    module = network.Olmax(cfg)

    def run(params, prompt, lengths, steps):
        return decoding.generate(module, params, prompt, lengths, jax.random.PRNGKey(0), max_steps, greedy=True,
                                 eos_id=None, cache_length=cfg.max_length, recompute=recompute, step_limit=steps)

    return module, run


def measure(length: int, mixer: str, args) -> dict:
    cfg = common.olmax_config(args.features, args.depth, length, mixer=mixer)
    batch = args.batch
    # Steps timed per path: recomputation is slow, so it gets fewer.
    steps = {"cached": (args.cached_steps[0], args.cached_steps[1]), "recompute": args.recompute_steps}
    room = length - length // 2 + 1  # generate() stops a row when its sequence fills the cache
    if max(max(n) for n in steps.values()) > room:
        raise SystemExit(f"--cached_steps/--recompute_steps must be <= {room} at N={length} (prompt N/2); lower them.")
    runs = {p: build(cfg, max(steps[p]), p == "recompute") for p in ("cached", "recompute")}
    module = runs["cached"][0]
    tok = jnp.ones((batch, length), jnp.int32)
    params = jax.jit(lambda r: module.init(r, tok, tok, enable_dropout=False))(jax.random.PRNGKey(0))["params"]
    rng = np.random.RandomState(0)
    prompt_len = length // 2
    prompt = np.zeros((batch, length), np.int32)
    prompt[:, :prompt_len] = rng.randint(2, cfg.vocab_size, (batch, prompt_len))
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    prompt = jnp.asarray(prompt)

    outputs = {}
    for path, (_, run) in runs.items():  # compile and check once
        outputs[path] = np.asarray(run(params, prompt, lengths, jnp.int32(min(steps[path]))))
    n = min(steps["recompute"])
    agree = bool((outputs["cached"][:, :n] == outputs["recompute"][:, :n]).all())

    best = {(p, n): float("inf") for p in runs for n in steps[p]}
    for _ in range(args.repeats):
        for path, (_, run) in runs.items():  # alternate the paths
            for n in steps[path]:
                best[path, n] = min(best[path, n], common.timed(lambda: run(params, prompt, lengths, jnp.int32(n))))
    row = {"length": length, "block": cfg.block_size, "mixer": mixer, "greedy_agree": agree}
    for path in runs:
        n1, n2 = steps[path]
        per_step = max((best[path, n2] - best[path, n1]) / (n2 - n1), 1e-9)
        row[f"{path}_step_ms"] = 1e3 * per_step
        row[f"{path}_tok_s"] = batch / per_step
        row[f"{path}_first_s"] = best[path, n1] - n1 * per_step  # prefill (cached) / nothing (recompute)
    row["speedup"] = row["cached_tok_s"] / row["recompute_tok_s"]
    return row


def hardware_line(args, load_before: float) -> str:
    return (
        f"{common.hardware_line(common.hardware())}; model: features {args.features}, depth {args.depth}, "
        f"conv_features {4 * args.features}, vocab 384, fp32; batch {args.batch}; greedy. "
        f"1-minute load average {load_before:.1f} before, {common.load():.1f} after (other work on the machine "
        "slows both paths alike; the two alternate)."
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| N | K | mixer | cached tok/s | recompute tok/s | speedup | cached ms/step | recompute ms/step "
        "| prefill s | greedy equal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['block']} | {r['mixer']} | {r['cached_tok_s']:.1f} | {r['recompute_tok_s']:.2f} | "
            f"{r['speedup']:.1f}x | {r['cached_step_ms']:.2f} | {r['recompute_step_ms']:.1f} | "
            f"{r['cached_first_s']:.3f} | {'yes' if r['greedy_agree'] else 'NO'} |"
        )
    return "\n".join(lines)


def check(rows: list[dict], text: str, lengths, mixers) -> None:
    assert len(rows) == len(lengths) * len(mixers), rows
    for r in rows:
        for key in ("cached_tok_s", "recompute_tok_s", "speedup", "cached_step_ms", "recompute_step_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["greedy_agree"], f"cached and recomputed greedy decoding disagree: {r}"
    assert text.count("\n|") == len(rows) + 1, text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test; writes nowhere unless --out")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--mixers", nargs="+", default=["recall", "axial", "attention"])
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cached_steps", type=int, nargs=2, default=[8, 120])
    parser.add_argument("--recompute_steps", type=int, nargs=2, default=[1, 3])
    parser.add_argument("--out", default=None, help=f"markdown file to write (default {RESULTS}; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.features, args.depth, args.batch, args.repeats = [64], 32, 1, 2, 2
        args.cached_steps, args.recompute_steps = [4, 30], [1, 3]
    out = args.out or (None if args.quick else RESULTS)

    load_before = common.load()
    rows = []
    for length in args.lengths:
        for mixer in args.mixers:
            row = measure(length, mixer, args)
            rows.append(row)
            print(
                f"N={length:5d} {mixer:9s} cached {row['cached_tok_s']:9.1f} tok/s  "
                f"recompute {row['recompute_tok_s']:8.2f} tok/s  x{row['speedup']:.1f}",
                flush=True,
            )
    text = table(rows)
    check(rows, text, args.lengths, args.mixers)
    hardware = hardware_line(args, load_before)
    print(hardware)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(
                "# Decoding speed: cached vs recomputed\n\n"
                f"Produced by `{' '.join(['python -m benchmarks.decode_speed'] + list(sys.argv[1:] if argv is None else argv))}` "
                "(see its docstring for the method).\n"
                "Tokens/s over the whole batch in the steady state of generation; prompt N/2; "
                "prefill s: the cached path's cache creation + prefill of the prompt.\n\n"
                f"Hardware: {hardware}\n\n{text}\n\n"
                "Reading it: a cached step costs O(K d + h F c) per layer with the recall mixer (its window "
                "and state), O((N/K + K) d) with the axial mixer, flat in N at these sizes (the small model's step is dominated by per-op overhead), and O(N d) with "
                "attention (its keys and values are read every step); recomputation costs a full forward, "
                "O(N^1.5 d) resp. O(N^2 d), per token. On a shared machine the absolute numbers move with "
                "the load; compare within a row (the two paths alternate).\n"
            )
        print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
