"""Train a SentencePiece vocabulary on local text files.

    python -m olmax.tasks.train_spm --input 'data/*.txt' --vocab_size 8000 \\
        --model_prefix out/spm

writes out/spm.model (and out/spm.vocab, the pieces as text). Use it with
`--gin.olmax_tasks.text_files.vocabulary="'out/spm.model'"`, with
`register_text_files_task(..., vocabulary='out/spm.model')`, or for c4_en_spm
with OLMAX_SPM_MODEL=out/spm.model.

Defaults, and why:
* ids as T5 / seqio expect: pad=0, eos=1, unk=2, no BOS.
* Lossless: `byte_fallback` (characters outside the vocabulary become byte
  pieces instead of UNK), identity normalization and no whitespace collapsing,
  so decode(encode(text)) == text, code indentation included. Byte fallback
  reserves 256 pieces, so vocab_size must exceed 259 + the distinct characters
  kept (about 300-400 for English text or code).
* Large inputs: a random sample of `--input_sentence_size` lines (SentencePiece
  trains on lines) keeps memory bounded; lines over `--max_sentence_length`
  bytes are skipped by SentencePiece.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import files as files_lib


def train_spm(
    input_patterns,
    vocab_size: int,
    model_prefix: str,
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    normalization: str = "identity",
    input_sentence_size: int = 5_000_000,
    max_sentence_length: int = 16384,
    num_threads: Optional[int] = None,
    quiet: bool = True,
) -> str:
    """Trains a SentencePiece model; returns the path of the `.model` file.

    Args:
      input_patterns: glob pattern(s) of text files (a string, commas separate
        several, or a list). Missing files raise FileNotFoundError.
      vocab_size: number of pieces, including pad / eos / unk (and, with
        byte_fallback, the 256 byte pieces).
      model_prefix: output path without extension; its directory is created.
      model_type: 'unigram' (T5's choice) or 'bpe', 'char', 'word'.
      character_coverage: share of characters that get their own piece; rarer
        ones are spelled with byte pieces (with byte_fallback).
      byte_fallback: see the module docstring.
      normalization: SentencePiece normalization rule; 'identity' is lossless,
        'nmt_nfkc' is T5's (it also collapses whitespace).
      input_sentence_size: at most this many sampled input lines (0: all).
      max_sentence_length: longest input line used, in bytes.
      num_threads: trainer threads (default: the CPU count, at most 16).
      quiet: hide SentencePiece's training log.

    Raises:
      FileNotFoundError: an input pattern matched nothing.
      ValueError: SentencePiece rejected the settings (e.g. vocab_size too small),
        with its message.
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    inputs = files_lib.expand_patterns(input_patterns, "train_spm --input")
    directory = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(directory, exist_ok=True)
    lossless = normalization == "identity"
    try:
        spm.SentencePieceTrainer.train(
            input=inputs,
            model_prefix=model_prefix,
            vocab_size=int(vocab_size),
            model_type=model_type,
            character_coverage=float(character_coverage),
            byte_fallback=bool(byte_fallback),
            normalization_rule_name=normalization,
            remove_extra_whitespaces=not lossless,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            input_sentence_size=int(input_sentence_size),
            shuffle_input_sentence=True,
            max_sentence_length=int(max_sentence_length),
            num_threads=num_threads or min(16, os.cpu_count() or 1),
            minloglevel=2 if quiet else 0,
        )
    except RuntimeError as e:
        hint = ""
        if "vocab" in str(e).lower():
            hint = (
                " Choose a larger --vocab_size (with byte fallback it needs more than "
                "259 + the number of distinct characters kept), lower "
                "--character_coverage, or give more text."
            )
        raise ValueError(f"SentencePiece training failed: {e}.{hint}") from e
    return model_prefix + ".model"


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m olmax.tasks.train_spm",
        description="Train a SentencePiece vocabulary on local text files.",
    )
    parser.add_argument(
        "--input", required=True, action="append",
        help="glob pattern of text files; repeat or separate with commas",
    )
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--model_prefix", required=True, help="output path without .model")
    parser.add_argument("--model_type", default="unigram",
                        choices=["unigram", "bpe", "char", "word"])
    parser.add_argument("--character_coverage", type=float, default=0.9995)
    parser.add_argument("--no_byte_fallback", action="store_true",
                        help="unknown characters become UNK instead of bytes")
    parser.add_argument("--normalization", default="identity",
                        help="SentencePiece normalization rule (identity, nmt_nfkc, ...)")
    parser.add_argument("--input_sentence_size", type=int, default=5_000_000)
    parser.add_argument("--max_sentence_length", type=int, default=16384)
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        path = train_spm(
            args.input,
            args.vocab_size,
            args.model_prefix,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=not args.no_byte_fallback,
            normalization=args.normalization,
            input_sentence_size=args.input_sentence_size,
            max_sentence_length=args.max_sentence_length,
            num_threads=args.num_threads,
            quiet=not args.verbose,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    size = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    print(f"Wrote {path} (vocab_size={size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
