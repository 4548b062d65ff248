"""Long-context language modelling: held-out bits per byte by position in book-length documents.

    python -m benchmarks.long_lm --fetch                     # fetch and convert the corpus once (below)
    python -m benchmarks.long_lm                             # 1000 steps at 8192 tokens (fetches if needed)
    python -m benchmarks.long_lm --length 2048 --steps 20 --chunk 10 --out /tmp/long_lm   # a smoke run
    python -m benchmarks.long_lm --corpus DIR                # any folder of .txt files, one document each

The recall mixer (the default Olmax) and the attention baseline (`common.attention_twin`:
the same network at equal parameters) train at equal steps on the same rows: each row a
contiguous window of `--length` bytes of one training document at a random offset
(documents drawn in proportion to their windows), byte tokens (id = byte + 3), batch 1 by
default. After every chunk each model scores the held-out rows: `--val_windows` windows per
validation document (4 by default) spread evenly through it (`validation_windows`), so that a
position in the row is how much of the document the model has read and the text at a position
is averaged over whole documents (0: one row from each document's first byte). Bits per byte in position buckets 0-1k, 1k-2k, 2k-4k, 4k-8k
(doubling up to the row's end; the first bucket is 1/8 of rows shorter than 8192) and overall,
and what a row's first half saves on its second. Claims: the recall mixer's overall held-out bpb
is at most attention's, and its loss keeps falling through the row (last bucket below the
1k-2k one).

Corpus: the English manuals (Texinfo, in info format) of 78 Debian 12 (bookworm) main
packages, PACKAGES below (binutils-doc, coreutils, autoconf-doc, bash-doc, guile-3.0-doc,
octave-doc, maxima-doc, r-doc-info, gnutls-doc, exim4-doc-info, zsh-doc, texinfo, ...).
Every `usr/share/info/*.info[-N].gz` manual of a package (split parts joined in order) is
one document: its nodes in order, each from its `File: ..., Node: ...` line, without the
file preambles (the copying notice, repeated in every part), the indirect and tag tables
and the image and index markers (`info_text`); translations (NOT_ENGLISH) and manuals under
64 KiB are left out. This gives 110 documents, 55.6 MB in all (66 KB to 3.2 MB, median
245 KB); 11 whole documents (3.1 MB; the 10% with the lowest CRC-32 of their names) are
held out. Licenses: free documentation licenses as Debian main requires: mostly the GNU
FDL (without invariant sections) or the GPL, some permissive (R's, gnuplot's, zsh's, ...);
each package's `copyright` file is copied to `<cache>/licenses/` (zsh-doc's is zsh-common's,
not in its .deb), and `<cache>/manifest.json` lists every .deb (file name with version,
sha256) and every document's size. `--fetch` runs, in `~/.cache/olmax/long_lm` (`--cache`):

    apt-get download <PACKAGES>     (into debs/, those not there yet; 117 MB; needs `apt-get update` once)
    dpkg-deb -x <each .deb> <tmp>   (then info_text -> text/<package>/<manual>.txt; ~30 s in all)

Writes benchmarks/results/long_lm.{md,json,png} after every round of chunks, so a stopped
run keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import jax
import numpy as np

from benchmarks import common
from benchmarks.common import Section, Target
from olmax import network

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "olmax", "long_lm")
MIN_BYTES = 64 * 1024
BYTE_OFFSET = 3  # the byte vocabulary's ids: 0 PAD, 1 EOS, 2 UNK, then byte b at b + 3

# Debian 12 main packages whose English info manuals make the corpus (each ships one of 64 KiB or more).
PACKAGES = (
    "aspell-doc", "auctex", "autoconf-doc", "autogen", "automake", "bash-doc", "binutils-doc", "coreutils", "cvs",
    "ddd", "dejagnu", "dico-doc", "diffutils", "elpa-ebib", "elpa-ess", "elpa-evil", "elpa-haskell-mode", "elpa-ivy",
    "elpa-magit", "exim4-doc-info", "findutils", "gcl-doc", "gettext", "global", "gnu-standards", "gnuastro",
    "gnuchess", "gnugo", "gnulib", "gnunet", "gnupg", "gnuplot-doc", "gnutls-doc", "gperf", "gri", "gtypist",
    "guile-3.0-doc", "guile-library", "gv", "indent", "ledger", "libgcrypt20-doc", "libgdbm-dev", "libmpfr-doc",
    "libtasn1-doc", "libtool-doc", "libunistring-dev", "mailutils-doc", "maxima-doc", "mes", "mgetty",
    "mit-scheme-doc", "mtools", "nano", "nettle-dev", "numdiff", "octave-doc", "parted-doc", "pspp", "r-doc-info",
    "rcs", "readline-doc", "recutils", "sbcl-doc", "screen", "sharutils", "shishi-doc", "slib", "slime", "texinfo",
    "texlive-binaries", "units", "w3m-el", "wget", "wl", "xboard", "xorriso", "zsh-doc",
)
NOT_ENGLISH = {"gtypist/gtypist.cs", "gtypist/gtypist.es", "w3m-el/emacs-w3m-ja", "wl/wl-ja"}  # translations


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ corpus

_INFO_FILE = re.compile(r"^(?P<stem>.+?)\.info(?:-(?P<part>\d+))?(?:\.gz)?$")
_MARKER = re.compile(rb"\x00\x08\[.*?\x00\x08\]", re.DOTALL)  # info's [image ...] and [index] markers


def info_text(parts: list[bytes]) -> bytes:
    """One manual's text from its info file(s) in order: the nodes (each from its `File:` line),
    without the preambles, the indirect and tag tables and the image and index markers."""
    nodes = [chunk for data in parts for chunk in data.split(b"\x1f")[1:] if chunk.startswith(b"\nFile:")]
    return _MARKER.sub(b"", b"".join(nodes).lstrip(b"\n"))


def info_manuals(root: str) -> dict[str, list[str]]:
    """The info manuals under root/usr/share/info: name (its path there, no suffix) -> its files in order."""
    found: dict[str, list[tuple[int, str]]] = {}
    info = os.path.join(root, "usr", "share", "info")
    for folder, _, files in os.walk(info):
        for f in files:
            m = _INFO_FILE.match(f)
            if m:
                name = os.path.relpath(os.path.join(folder, m["stem"]), info)
                found.setdefault(name, []).append((int(m["part"] or 0), os.path.join(folder, f)))
    return {name: [p for _, p in sorted(parts)] for name, parts in found.items()}


def _read(path: str) -> bytes:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        return f.read()


def fetch(cache: str = CACHE, min_bytes: int = MIN_BYTES) -> str:
    """Download PACKAGES into <cache>/debs (those not there yet), convert their info manuals of at
    least min_bytes into <cache>/text/<package>/<manual>.txt and write the manifest; returns the text folder."""
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    missing = [p for p in PACKAGES if not glob.glob(os.path.join(debs, f"{p}_*.deb"))]
    if missing:
        log(f"apt-get download {len(missing)} packages into {debs}")
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    text, licenses = os.path.join(cache, "text"), os.path.join(cache, "licenses")
    for folder in (text, licenses):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    manifest: dict = {"packages": {}, "documents": {}}
    for deb in sorted(glob.glob(os.path.join(debs, "*.deb"))):
        package = os.path.basename(deb).split("_")[0]
        if package not in PACKAGES:
            continue
        with open(deb, "rb") as f:
            sha256 = hashlib.sha256(f.read()).hexdigest()
        manifest["packages"][package] = {"deb": os.path.basename(deb), "sha256": sha256}
        with tempfile.TemporaryDirectory() as root:
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
            for name, files in sorted(info_manuals(root).items()):
                if f"{package}/{name}" in NOT_ENGLISH:
                    continue
                body = info_text([_read(p) for p in files])
                if len(body) >= min_bytes:
                    path = os.path.join(text, package, name + ".txt")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(body)
                    manifest["documents"][f"{package}/{name}"] = len(body)
            copyright_file = os.path.join(root, "usr", "share", "doc", package, "copyright")
            if os.path.exists(copyright_file):  # a doc folder linked to another package's is not in this .deb
                shutil.copy(copyright_file, os.path.join(licenses, f"{package}.copyright"))
    with open(os.path.join(cache, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    sizes = manifest["documents"].values()
    log(f"{len(sizes)} documents, {sum(sizes) / 1e6:.1f} MB, in {text}")
    return text


def read_documents(folder: str, min_bytes: int = MIN_BYTES) -> dict[str, np.ndarray]:
    """Every .txt file under `folder` (recursively) of at least min_bytes, as bytes [n] uint8, by its
    path relative to `folder` without .txt, sorted by name."""
    docs = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.txt"), recursive=True)):
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), np.uint8)
        if data.size >= min_bytes:
            docs[os.path.relpath(path, folder)[:-len(".txt")]] = data
    return docs


def split(names: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation): whole documents; validation is the max(1, round(fraction n)) names with the
    lowest CRC-32, so a document keeps its side when others come or go."""
    if len(names) < 2:
        raise ValueError(f"need at least 2 documents for a held-out split, got {len(names)}")
    k = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    val = set(sorted(names, key=lambda n: (zlib.crc32(n.encode()), n))[:k])
    return [n for n in names if n not in val], [n for n in names if n in val]


# -------------------------------------------------------------------- rows


def batch_of(rows: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Byte rows [length] -> the train step's features (common.TRAIN_KEYS): targets the bytes' ids,
    inputs shifted right with 0 first, every weight 1, one segment, positions 0..length-1."""
    return common.lm_batch(np.stack(rows).astype(np.int32) + BYTE_OFFSET)


class TrainRows:
    """Batch i of the training stream: `batch` windows of `length` bytes, each of one document at a
    uniformly random offset, documents drawn in proportion to their windows (every window alike);
    a function of (seed, i) only, so every model sees the same batches without a cache."""

    def __init__(self, docs: list[np.ndarray], length: int, batch: int, seed: int = 0):
        self.docs = [d for d in docs if d.size >= length]
        if not self.docs:
            raise ValueError(f"no training document of at least {length} bytes")
        windows = np.array([d.size - length + 1 for d in self.docs], np.float64)
        self.p, self.length, self.batch, self.seed = windows / windows.sum(), length, batch, seed

    def windows(self, i: int) -> list[tuple[int, int]]:
        """(document index, offset) of each row of batch i."""
        rng = np.random.RandomState([self.seed, i])
        picks = rng.choice(len(self.docs), size=self.batch, p=self.p)
        return [(int(d), int(rng.randint(self.docs[d].size - self.length + 1))) for d in picks]

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        return batch_of([self.docs[d][o:o + self.length] for d, o in self.windows(i)])


def validation_windows(docs: dict[str, np.ndarray], names: list[str], length: int,
                       per_doc: int = 1) -> list[tuple[str, int]]:
    """(document, offset) of the held-out rows: `per_doc` windows of `length` bytes in each validation
    document of at least `length` bytes, the i-th at (i + 1/2) / per_doc of the way from offset 0 to
    the last offset (fewer where the document has fewer distinct offsets); per_doc = 0: one window,
    the document's first bytes. The spread windows leave the opening out: a manual opens with its
    title, copying notice and menu, text easier than the rest at exactly the row's first positions."""
    out = []
    for n in names:
        if docs[n].size >= length:
            last = docs[n].size - length
            offsets = np.unique(((np.arange(per_doc) + 0.5) * last / per_doc).round().astype(int)) if per_doc else [0]
            out += [(n, int(o)) for o in offsets]
    return out


def validation_rows(docs: dict[str, np.ndarray], windows: list[tuple[str, int]], length: int,
                    start: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """One batch per held-out window (validation_windows): the window's bytes start .. length
    (start = length // 2: each window's second half as a row of its own, scored without the first)."""
    return {f"{n}@{o}": batch_of([docs[n][o + start:o + length]]) for n, o in windows}


def context_gain(bits: np.ndarray, alone: np.ndarray) -> float:
    """Bits per byte that a row's first half saves on its second half: the second half scored
    alone (`alone` [rows, length/2]) minus the same bytes scored after the first half (`bits`
    [rows, length]). > 0 where the model reads the earlier document."""
    return float(alone.mean() - bits[:, bits.shape[1] - alone.shape[1]:].mean())


def bucket_edges(length: int) -> list[int]:
    """Position buckets [e_i, e_i+1) covering 0..length: 0, f, 2f, 4f, ..., length with f = 1024
    (f = length // 8 for rows shorter than 8192, so that there are always 4 or more)."""
    first = 1024 if length >= 8192 else max(1, length // 8)
    edges, e = [0], first
    while e < length:
        edges.append(e)
        e *= 2
    return edges + [length]


def bucket_label(lo: int, hi: int) -> str:
    def k(n: int) -> str:
        return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)

    return f"{k(lo)}-{k(hi)}"


# ----------------------------------------------------------------- scoring


def position_bits(trainee: common.Trainee, val: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    """Bits of every held-out byte [rows, length], one row per call (rows are long)."""
    fn = common.target_logprobs(trainee.cfg)
    logp = [np.asarray(jax.device_get(fn(trainee.state["params"], b)[0])) for b in val.values()]
    return -np.concatenate(logp) / math.log(2)


def bucket_bpb(bits: np.ndarray, edges: list[int]) -> list[float]:
    return [float(bits[:, lo:hi].mean()) for lo, hi in itertools.pairwise(edges)]


# ------------------------------------------------------------------- race


@dataclasses.dataclass(frozen=True)
class Setup:
    length: int = 8192
    features: int = 128  # olmax/gin/models/tiny.gin's width and depth
    depth: int = 4
    batch: int = 1
    steps: int = 1000
    chunk: int = 100
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    val_fraction: float = 0.1
    val_windows: int = 4  # held-out rows per validation document (validation_windows)
    min_bytes: int = MIN_BYTES
    mixers: tuple[str, ...] = ("recall", "attention")
    seed: int = 0


def configs(s: Setup) -> dict[str, network.OlmaxConfig]:
    cfg = common.olmax_config(s.features, s.depth, s.length)
    return {"recall": cfg, "attention": common.attention_twin(cfg)}


def run(s: Setup, corpus: str, out: str, command: str) -> Section:
    """Train the mixers in interleaved chunks, score the held-out rows after each chunk and write
    the section after every round; returns the last one."""
    start, load0 = time.perf_counter(), common.load()
    docs = read_documents(corpus, s.min_bytes)
    train_names, val_names = split(list(docs), s.val_fraction)
    train = TrainRows([docs[n] for n in train_names], s.length, s.batch, s.seed)
    windows = validation_windows(docs, val_names, s.length, s.val_windows)
    if not windows:
        raise ValueError(f"no validation document of at least {s.length} bytes in {corpus}")
    val = validation_rows(docs, windows, s.length)
    halves = validation_rows(docs, windows, s.length, start=s.length // 2)
    scored = sorted({n for n, _ in windows})
    corpus_info = {"folder": corpus, "documents": len(docs), "bytes": int(sum(d.size for d in docs.values())),
                   "train": len(train_names), "train_used": len(train.docs),
                   "train_bytes": int(sum(docs[n].size for n in train_names)), "validation": scored,
                   "validation_rows": len(windows), "validation_too_short": [n for n in val_names if n not in scored]}
    log(f"{len(docs)} documents ({corpus_info['bytes'] / 1e6:.1f} MB): {len(train_names)} train, "
        f"{len(val_names)} held out ({len(scored)} of >= {s.length} bytes, {len(windows)} rows)")
    cfgs = configs(s)
    trainees = [common.Trainee(m, cfgs[m], (s.batch, s.length), train, [], learning_rate=s.learning_rate,
                               warmup_steps=s.warmup_steps, seed=s.seed) for m in s.mixers]
    edges = bucket_edges(s.length)
    curves: dict[str, list[dict]] = {t.name: [] for t in trainees}
    section = None
    order = list(trainees)
    while any(t.step < s.steps for t in trainees):
        for t in order:
            t.train(min(s.chunk, s.steps - t.step))
            bits = position_bits(t, val)
            point = {"step": t.step, "seconds": t.seconds, "bpb": float(bits.mean()),
                     "buckets": bucket_bpb(bits, edges), "context_gain": context_gain(bits, position_bits(t, halves))}
            curves[t.name].append(point)
            log(f"  {t.name:9s} step {t.step:5d}  held-out bpb {point['bpb']:.3f}  by position "
                + " ".join(f"{b:.3f}" for b in point["buckets"]) + f", first half saves {point['context_gain']:.3f}"
                + f"  ({t.seconds:.0f} s, step {np.median(t.step_times):.2f} s, load {common.load():.1f})")
        order.reverse()
        section = _section(s, trainees, curves, edges, corpus_info)
        _plot(section, out)
        context = {"command": command, "seconds": time.perf_counter() - start, "load": (load0, common.load()),
                   "hardware": common.hardware()}
        common.write_section(out, section, context)
    return section


def _section(s: Setup, trainees: list[common.Trainee], curves: dict[str, list[dict]], edges: list[int],
             corpus: dict) -> Section:
    """Every mixer at the mixers' last common step."""
    step = min(curves[t.name][-1]["step"] for t in trainees)
    at = {t.name: next(p for p in curves[t.name] if p["step"] == step) for t in trainees}
    labels = [bucket_label(lo, hi) for lo, hi in itertools.pairwise(edges)]
    rows = []
    for t in trainees:
        p = at[t.name]
        b = p["buckets"]
        falls = sum(y < x for x, y in itertools.pairwise(b))
        rows.append([t.name, t.params, step, float(np.median(t.step_times)), p["bpb"], *b, b[-1] - b[0],
                     f"{falls} of {len(b) - 1}", p["context_gain"]])
    targets = []
    if "recall" in at and "attention" in at:
        r, a = at["recall"]["bpb"], at["attention"]["bpb"]
        targets.append(Target(f"recall mixer's held-out bpb vs attention's, equal steps ({step}) and tokens, "
                              f"rows of {s.length}", "<= attention", f"{r:.3f} vs {a:.3f} ({r - a:+.3f})", r <= a))
    if "recall" in at:
        b = at["recall"]["buckets"]
        targets.append(Target(f"recall mixer's loss keeps falling through the row: bpb at {labels[-1]} vs "
                              f"{labels[1]}", "lower", f"{b[-1]:.3f} vs {b[1]:.3f} ({b[-1] - b[1]:+.3f})",
                              b[-1] < b[1]))
        gain = at["recall"]["context_gain"]
        targets.append(Target(f"recall mixer reads the document: bpb on bytes {s.length // 2}-{s.length} after the "
                              f"first {s.length // 2} vs alone", "lower", f"{gain:.3f} bits per byte saved"
                              + (f" (attention: {at['attention']['context_gain']:.3f})" if "attention" in at else ""),
                              gain > 0))
    done = all(t.step >= s.steps for t in trainees)
    cfg = configs(s)["recall"]
    val = corpus["validation"]
    return Section(
        name="long_lm",
        title=f"Long-context language modelling: held-out bits per byte by position ({s.length}-byte rows)",
        header=["mixer", "params", "steps", "step s", "held-out bpb"] + [f"bpb {x}" for x in labels]
        + ["last - first bucket", "bucket-to-bucket falls",
           f"bits saved on {s.length // 2}-{s.length} by 0-{s.length // 2}"],
        rows=rows, targets=targets, plots=["long_lm.png"],
        notes=[
            f"Corpus: `{corpus['folder']}`, {corpus['documents']} documents of >= {s.min_bytes:,} bytes, "
            f"{corpus['bytes'] / 1e6:.1f} MB (by default the info manuals of Debian packages: see "
            "benchmarks/long_lm.py); held out by whole document: "
            f"{len(val)} documents scored ({', '.join(val)}), {corpus['validation_rows']} rows, training on {corpus['train_used']} documents "
            f"({corpus['train_bytes'] / 1e6:.1f} MB)"
            + (f"; {len(corpus['validation_too_short'])} held-out documents shorter than a row are not scored"
               if corpus["validation_too_short"] else "") + ".",
            (f"Models: features {s.features}, depth {s.depth}, conv_features {cfg.conv_features} (attention: "
             f"adjusted to equal parameters), 4 heads, K = {cfg.block_size}, byte vocabulary, fp32, reversible."),
            (f"Recipe: {step} steps of {s.batch} x {s.length} bytes (each row a window of one training document "
             f"at a random offset; the same rows for every model), AdamW + AGC, LR {s.learning_rate} after "
             f"{s.warmup_steps} warm-up steps, constant; trained in interleaved chunks of {s.chunk} steps; "
             "`step s`: median seconds of a jitted train step."),
            ((f"Evaluation: {s.val_windows} windows of {s.length} bytes per held-out document, the i-th at "
              f"(i + 1/2) / {s.val_windows} of the way through it, so a position in the row is how much of the "
              "document the model has just read, and the text at each position is averaged over the document "
              "rather than taken from its opening (a manual opens with its title, copying notice and menu, its "
              "most predictable text, which rows from offset 0 put at exactly the first positions)"
              if s.val_windows else
              "Evaluation: each held-out row is the first bytes of its document (position in the row = position "
              "in the document; a manual opens with its title, copying notice and menu, its most predictable "
              "text)") + "; bits per byte over every byte and over each position bucket. The claim compares the "
             "last bucket with the second (the first has the least context). The last column isolates the "
             "reading: the second half of each row scored as a row of its own, minus the same bytes scored after "
             "the first half."),
        ] + ([] if done else [f"In progress: step {step} of {s.steps}."]),
        data={"setup": dataclasses.asdict(s), "edges": edges, "curves": curves, "corpus": corpus},
    )


def _plot(section: Section, out: str) -> None:
    """Bits per byte by position bucket per mixer (left), held-out bpb against steps (right)."""
    edges, curves = section.data["edges"], section.data["curves"]
    fig, (ax, ax_steps) = common.figure(2)
    labels = [bucket_label(lo, hi) for lo, hi in itertools.pairwise(edges)]
    for row, marker in zip(section.rows, "os^"):
        name, buckets = row[0], row[5:5 + len(labels)]
        ax.plot(range(len(labels)), buckets, marker=marker, label=name)
        ax_steps.plot([p["step"] for p in curves[name]], [p["bpb"] for p in curves[name]], marker=marker, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(xlabel="position in the document (bytes)", ylabel="held-out bits per byte",
           title=f"By position, step {section.rows[0][2]}")
    ax_steps.set(xlabel="training step", ylabel="held-out bits per byte", title="Held-out bpb")
    for a in (ax, ax_steps):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    os.makedirs(out, exist_ok=True)
    common.save_figure(fig, out, "long_lm.png")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    d = Setup()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fetch", action="store_true", help="only fetch and convert the corpus into --cache")
    parser.add_argument("--cache", default=CACHE, help="where the Debian corpus is fetched and converted")
    parser.add_argument("--corpus", default=None,
                        help="a folder of .txt files (default: <cache>/text, fetched if absent)")
    parser.add_argument("--length", type=int, default=d.length)
    parser.add_argument("--features", type=int, default=d.features)
    parser.add_argument("--depth", type=int, default=d.depth)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--chunk", type=int, default=d.chunk)
    parser.add_argument("--lr", type=float, default=d.learning_rate)
    parser.add_argument("--warmup", type=int, default=d.warmup_steps)
    parser.add_argument("--val_fraction", type=float, default=d.val_fraction)
    parser.add_argument("--val_windows", type=int, default=d.val_windows,
                        help="held-out rows per validation document, spread evenly through it (0: its first bytes)")
    parser.add_argument("--min_bytes", type=int, default=d.min_bytes, help="documents shorter than this are left out")
    parser.add_argument("--mixers", default=",".join(d.mixers))
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.fetch:
        fetch(args.cache, args.min_bytes)
        return
    corpus = args.corpus
    if corpus is None:
        corpus = os.path.join(args.cache, "text")
        if not os.path.exists(os.path.join(args.cache, "manifest.json")):
            fetch(args.cache, args.min_bytes)
    s = Setup(length=args.length, features=args.features, depth=args.depth, batch=args.batch, steps=args.steps,
              chunk=args.chunk, learning_rate=args.lr, warmup_steps=args.warmup, val_fraction=args.val_fraction,
              val_windows=args.val_windows, min_bytes=args.min_bytes, mixers=tuple(args.mixers.split(",")), seed=args.seed)
    section = run(s, corpus, args.out, " ".join(["python -m benchmarks.long_lm", *argv]))
    with open(os.path.join(args.out, f"{section.name}.md")) as f:
        log(f.read())


if __name__ == "__main__":
    main()
