"""Tests of olmax_tasks: corpora, text files via Gin / env, vocabularies, registry."""

import importlib
import json
import os
import shlex
import subprocess
import sys
import textwrap

import gin
import numpy as np
import pytest
import seqio

from olmax import tasks as olmax_tasks
from olmax.tasks import files as files_lib
from olmax.tasks import stdlib
from olmax.tasks import text_files_task
from olmax.tasks import tfds_tasks
from olmax.tasks import train_spm

TASKS_DIR = os.path.dirname(os.path.abspath(olmax_tasks.__file__))


def _texts(ds, n=None):
    if n is not None:
        ds = ds.take(n)
    return [ex["text"].decode("utf-8") for ex in ds.as_numpy_iterator()]


def _targets(ds, n=None):
    if n is not None:
        ds = ds.take(n)
    return [ex["targets"] for ex in ds.as_numpy_iterator()]


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def no_text_env(monkeypatch):
    for var in (
        text_files_task.TRAIN_FILES_ENV,
        text_files_task.VALIDATION_FILES_ENV,
        text_files_task.VOCAB_ENV,
    ):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def corpus_dir(tmp_path):
    """Three small text files, one with two blank-line-separated paragraphs."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("Alpha file.\nSecond line of alpha.\n")
    (data / "b.txt").write_text("Beta paragraph one.\n\n\nBeta paragraph two.\n")
    (data / "c.txt").write_text("Gamma: naïve café — 漢字.\n")
    (tmp_path / "val.txt").write_text("Held-out validation text.\n")
    return tmp_path


# ------------------------------------------------------------- stdlib corpus


def test_stdlib_split_disjoint_nonempty_and_complete():
    train = stdlib.stdlib_split_files("train")
    validation = stdlib.stdlib_split_files("validation")
    assert train and validation
    assert not set(train) & set(validation)
    root = files_lib.stdlib_root()
    every = {os.path.join(root, p) for p in files_lib.list_stdlib_files()}
    assert set(train) | set(validation) == every
    assert 0.005 < len(validation) / len(every) < 0.06
    assert not any("site-packages" in f for f in every)


def test_stdlib_split_independent_of_pythonhashseed():
    """The split is recomputed from files.py alone, under two hash seeds."""
    code = textwrap.dedent(f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location(
            "olmax_files", {os.path.join(TASKS_DIR, "files.py")!r})
        files = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(files)
        print(json.dumps(files.split_files_by_path(
            files.list_stdlib_files(), "validation")))
    """)
    expected = files_lib.split_files_by_path(files_lib.list_stdlib_files(), "validation")
    root = files_lib.stdlib_root()
    assert [os.path.join(root, p) for p in expected] == list(
        stdlib.stdlib_split_files("validation")
    )
    for seed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
        )
        assert json.loads(out.stdout) == expected


def test_stdlib_dataset_tokens_deterministic_and_packed():
    task = seqio.get_mixture_or_task(olmax_tasks.STDLIB_TASK)
    vocab = task.output_features["targets"].vocabulary
    assert vocab.vocab_size == olmax_tasks.BYTE_VOCAB_IDS == 259
    assert olmax_tasks.BYTE_VOCAB_SIZE == 384

    def first(n=6):
        ds = task.get_dataset({"targets": 128}, split="train", shuffle=False)
        return _targets(ds, n)

    a, b = first(), first()
    assert len(a) == 6
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x in a:
        assert x.dtype == np.int32 and 0 < len(x) <= 128
        assert x.min() >= 1 and x.max() < vocab.vocab_size
    # Long documents are split into full-length pieces, not truncated.
    assert len(a[0]) == 128

    ds = task.get_dataset({"targets": 128}, split="train", shuffle=False)
    packed = seqio.DecoderFeatureConverter(pack=True)(ds, {"targets": 128})
    batch = next(packed.batch(2).as_numpy_iterator())
    for key in (
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_segment_ids",
        "decoder_positions",
        "decoder_loss_weights",
    ):
        assert batch[key].shape == (2, 128), key
        assert batch[key].dtype == np.int32
    np.testing.assert_array_equal(
        batch["decoder_input_tokens"][:, 1:], batch["decoder_target_tokens"][:, :-1]
    )


def test_stdlib_validation_reads_its_files_and_shards_by_file():
    task = seqio.get_mixture_or_task(olmax_tasks.STDLIB_TASK)
    files = stdlib.stdlib_split_files("validation")
    texts = _texts(task.get_dataset(None, split="validation", shuffle=False), 2)
    with open(files[0], encoding="utf-8") as f:
        assert texts[0] == f.read().replace("\r\n", "\n")
    source = task.source
    assert source.list_shards("validation") == list(files)
    shard = source.get_dataset(
        "validation", shuffle=False, shard_info=seqio.ShardInfo(index=1, num_shards=2)
    )
    first = next(shard.as_numpy_iterator())["text"].decode()
    with open(files[1], encoding="utf-8") as f:
        assert first == f.read().replace("\r\n", "\n")


def test_reimport_and_reregister_do_not_raise():
    importlib.reload(stdlib)
    importlib.reload(tfds_tasks)
    olmax_tasks.register_stdlib_task()
    olmax_tasks.register_stdlib_task()
    assert olmax_tasks.STDLIB_TASK in seqio.TaskRegistry.names()


# ------------------------------------------------------------- text files


def _gin_flag_to_binding(flag):
    """What the binaries do with `--gin.KEY=VALUE`: the Gin binding `KEY=VALUE`."""
    assert flag.startswith("--gin.")
    key, value = flag[len("--gin."):].split("=", 1)
    return f"{key} = {value}"


@pytest.mark.parametrize("dynamic_registration", [False, True])
def test_text_files_task_from_gin_command_line(
    corpus_dir, clean_gin, no_text_env, dynamic_registration
):
    # A Gin file (Olmax's own use `dynamic_registration`) plus exactly the
    # documented command-line form, as the shell hands it over.
    header = "from __gin__ import dynamic_registration\n" if dynamic_registration else ""
    gin_file = corpus_dir / "run.gin"
    gin_file.write_text(
        header + "import olmax_tasks\nolmax_tasks.text_files.document_mode = 'paragraph'\n"
    )
    command_line = (
        f"--gin.olmax_tasks.text_files.train_patterns=\"['{corpus_dir}/data/*.txt']\" "
        f"--gin.olmax_tasks.text_files.validation_patterns=\"'{corpus_dir}/val.txt'\""
    )
    bindings = [_gin_flag_to_binding(f) for f in shlex.split(command_line)]
    gin.parse_config_files_and_bindings([str(gin_file)], bindings, finalize_config=True)
    assert gin.config_is_locked()

    task = seqio.get_mixture_or_task(text_files_task.TEXT_FILES_TASK)
    train = _texts(task.get_dataset(None, split="train", shuffle=False))
    assert train == [
        "Alpha file.\nSecond line of alpha.\n",
        "Beta paragraph one.",
        "Beta paragraph two.\n",
        "Gamma: naïve café — 漢字.\n",
    ]
    assert _texts(task.get_dataset(None, split="validation", shuffle=False)) == [
        "Held-out validation text.\n"
    ]
    tokens = _targets(task.get_dataset({"targets": 16}, split="train", shuffle=True, seed=1))
    assert tokens and all(t.dtype == np.int32 and len(t) <= 16 for t in tokens)


def test_text_files_task_from_env_var(corpus_dir, clean_gin, no_text_env):
    no_text_env.setenv(
        text_files_task.TRAIN_FILES_ENV, f"{corpus_dir}/data/a.txt,{corpus_dir}/data/c.txt"
    )
    task = seqio.get_mixture_or_task(text_files_task.TEXT_FILES_TASK)
    assert task.output_features["targets"].vocabulary.vocab_size == 259
    docs = _texts(task.get_dataset(None, split="train", shuffle=False)) + _texts(
        task.get_dataset(None, split="validation", shuffle=False)
    )
    assert sorted(docs) == [
        "Alpha file.\nSecond line of alpha.\n",
        "Gamma: naïve café — 漢字.\n",
    ]
    ds = task.get_dataset({"targets": 8}, split="train", shuffle=False)
    assert all(len(t) <= 8 for t in _targets(ds))

    # Mixes with the stdlib corpus (same concrete byte vocabulary).
    seqio.MixtureRegistry.remove("test_text_and_stdlib")
    mixture = seqio.MixtureRegistry.add(
        "test_text_and_stdlib", [("text_files", 1.0), ("olmax_stdlib", 1.0)]
    )
    mixed = mixture.get_dataset({"targets": 32}, split="train", shuffle=True, seed=0)
    assert len(_targets(mixed, 4)) == 4


def test_text_files_content_split_is_disjoint_and_lossless(tmp_path):
    lines = [f"line number {i} of the corpus" for i in range(400)]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    task = olmax_tasks.register_text_files_task(
        "test_line_docs", str(tmp_path / "*.txt"), document_mode="line"
    )
    train = _texts(task.get_dataset(None, split="train", shuffle=False))
    validation = _texts(task.get_dataset(None, split="validation", shuffle=False))
    assert validation and train
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(lines)

    # A document longer than the sequence length is split, every token kept.
    vocab = task.output_features["targets"].vocabulary
    expected = vocab.encode(train[0]) + [vocab.eos_id]
    count = -(-len(expected) // 7)
    pieces = _targets(task.get_dataset({"targets": 7}, split="train", shuffle=False), count)
    assert [len(p) for p in pieces[:-1]] == [7] * (count - 1)
    np.testing.assert_array_equal(np.concatenate(pieces), expected)


def test_missing_file_pattern_raises_clear_error(tmp_path, clean_gin, no_text_env):
    (tmp_path / "real.txt").write_text("exists\n")
    missing = str(tmp_path / "nope" / "*.txt")
    task = olmax_tasks.register_text_files_task(
        "test_missing", [missing, str(tmp_path / "*.txt")]
    )  # Registering checks nothing on disk.
    with pytest.raises(FileNotFoundError) as info:
        task.get_dataset({"targets": 32}, split="train")
    message = str(info.value)
    assert repr(missing) in message and "test_missing train pattern" in message
    assert "real.txt" not in message

    with pytest.raises(FileNotFoundError, match="is a directory"):
        olmax_tasks.register_text_files_task("test_dir", str(tmp_path)).get_dataset(
            None, split="train"
        )

    # The default task with nothing configured says how to configure it.
    with pytest.raises(ValueError, match="OLMAX_TEXT_FILES") as info:
        seqio.get_mixture_or_task("text_files").get_dataset(None, split="train")
    assert "olmax_tasks.text_files.train_patterns" in str(info.value)

    # Through Gin, the missing pattern is named too.
    gin.parse_config_files_and_bindings(
        None, [f"olmax_tasks.text_files.train_patterns = {[missing]!r}"]
    )
    with pytest.raises(FileNotFoundError, match="text_files train pattern"):
        seqio.get_mixture_or_task("text_files").get_dataset(None, split="train")


# ------------------------------------------------------------- registry


def test_unknown_task_lists_registered_names():
    with pytest.raises(ValueError) as info:
        olmax_tasks.get_task_or_mixture("olmax_stdlb")
    message = str(info.value)
    assert "'olmax_stdlb'" in message and "Did you mean 'olmax_stdlib'" in message
    for name in ("olmax_stdlib", "text_files", "c4_en_bytes", "c4_en_spm", "lm1b_bytes"):
        assert name in message
    assert "MIXTURE_OR_TASK_MODULE" in message
    assert olmax_tasks.get_task_or_mixture("olmax_stdlib").name == "olmax_stdlib"


def test_tfds_tasks_register_without_touching_disk(tmp_path, monkeypatch):
    absent = tmp_path / "tfds_absent"
    try:
        tfds_tasks.register_tfds_tasks(tfds_data_dir=str(absent))
        expected = {
            "c4_en_bytes": "c4/en:3.1.0",
            "c4_en_spm": "c4/en:3.1.0",
            "lm1b_bytes": "lm1b:1.1.0",
        }
        for name, tfds_name in expected.items():
            task = seqio.TaskRegistry.get(name)
            assert isinstance(task.source, seqio.TfdsDataSource)
            assert task.source.tfds_dataset.name == tfds_name
            assert not task.source.tfds_dataset.is_memoized()
            assert set(task.source.splits) == {"train", "validation"}
        assert not absent.exists()
        # The spm model is only looked for when the vocabulary is used.
        monkeypatch.delenv("OLMAX_SPM_MODEL", raising=False)
        spm_task = seqio.TaskRegistry.get("c4_en_spm")
        with pytest.raises(ValueError, match="OLMAX_SPM_MODEL"):
            _ = spm_task.output_features
        monkeypatch.setenv("OLMAX_SPM_MODEL", str(tmp_path / "none.model"))
        with pytest.raises(FileNotFoundError, match="none.model"):
            _ = spm_task.output_features
    finally:
        tfds_tasks.register_tfds_tasks()


def test_user_task_module_by_path_and_by_name(tmp_path, monkeypatch):
    (tmp_path / "docs.txt").write_text("user corpus\n")
    module_file = tmp_path / "my_user_tasks.py"
    module_file.write_text(textwrap.dedent(f"""
        import olmax_tasks
        olmax_tasks.register_text_files_task("my_user_task", {str(tmp_path / '*.txt')!r})
    """))
    seqio.TaskRegistry.remove("my_user_task")
    olmax_tasks.import_task_module(str(module_file))
    olmax_tasks.import_task_module(str(module_file))  # Twice is fine.
    task = olmax_tasks.get_task_or_mixture("my_user_task")
    docs = _texts(task.get_dataset(None, split="train", shuffle=False)) + _texts(
        task.get_dataset(None, split="validation", shuffle=False)
    )
    assert docs == ["user corpus\n"]

    # By dotted name from the working directory, as MIXTURE_OR_TASK_MODULE='pkg'.
    (tmp_path / "dotted_user_tasks.py").write_text(
        "import seqio, olmax_tasks\n"
        "olmax_tasks.register_text_files_task('dotted_task', 'x.txt')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    olmax_tasks.import_task_module("dotted_user_tasks")
    assert "dotted_task" in seqio.TaskRegistry.names()

    broken = tmp_path / "broken_tasks.py"
    broken.write_text("x = 1 / 0\n")
    with pytest.raises(ImportError) as info:
        olmax_tasks.import_task_module(str(broken))
    assert "broken_tasks.py" in str(info.value) and "ZeroDivisionError" in str(info.value)
    with pytest.raises(ImportError, match="no_such_task_module_xyz"):
        olmax_tasks.import_task_module("no_such_task_module_xyz")


# ------------------------------------------------------------- sentencepiece


def test_spm_vocabulary_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_spm"):
        olmax_tasks.spm_vocabulary(tmp_path / "absent.model")
    assert olmax_tasks.get_vocabulary("byte") is olmax_tasks.byte_vocabulary()


def _spm_corpus_text():
    with open(os.path.join(files_lib.stdlib_root(), "json", "decoder.py"), encoding="utf-8") as f:
        code = f.read()
    return code + "\nnaïve café — 漢字, two  spaces\tand a tab\n"


@pytest.fixture(scope="module", autouse=True)
def spm_cli_run(tmp_path_factory):
    """Runs `python -m olmax_tasks.train_spm` in a subprocess.

    Started before this module's first test so that the subprocess (mostly the
    seconds it takes to import TensorFlow) overlaps the other tests; collected by
    the sentencepiece test.
    """
    work = tmp_path_factory.mktemp("spm_cli")
    (work / "corpus.txt").write_text(_spm_corpus_text(), encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "olmax_tasks.train_spm", "--input",
         str(work / "*.txt"), "--vocab_size", "384", "--model_prefix",
         str(work / "out" / "spm")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        cwd=str(work),  # As a user would, from their own directory.
    )
    yield process, work / "out" / "spm.model"
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_train_spm_function_cli_and_text_files_task(tmp_path, spm_cli_run):
    text = _spm_corpus_text()
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    pattern = str(tmp_path / "*.txt")

    model = train_spm.train_spm(pattern, 384, str(tmp_path / "fn" / "spm"))
    assert model == str(tmp_path / "fn" / "spm.model") and os.path.exists(model)

    task = olmax_tasks.register_text_files_task(
        "test_spm_text", pattern, vocabulary=model, validation_patterns=pattern
    )
    vocab = task.output_features["targets"].vocabulary
    assert vocab.vocab_size == 384 and vocab.eos_id == 1 and vocab.pad_id == 0
    (ids,) = _targets(task.get_dataset(None, split="validation", shuffle=False))
    assert ids.dtype == np.int32 and ids.max() < 384 and ids[-1] == 1
    assert vocab.decode(ids.tolist()) == text
    pieces = _targets(task.get_dataset({"targets": 64}, split="train", shuffle=False))
    assert all(len(p) <= 64 for p in pieces)
    np.testing.assert_array_equal(np.concatenate(pieces), ids)

    with pytest.raises(ValueError, match="vocab_size"):
        train_spm.train_spm(pattern, 100, str(tmp_path / "small" / "spm"))
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        train_spm.train_spm(str(tmp_path / "nothing_here*.txt"), 384, str(tmp_path / "x"))

    # c4_en_spm takes its model from Gin (or OLMAX_SPM_MODEL) when needed.
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            None, [f"olmax_tasks.spm_model.path = {model!r}"], finalize_config=True
        )
        spm_features = seqio.TaskRegistry.get("c4_en_spm").output_features
        assert isinstance(spm_features["targets"].vocabulary, seqio.SentencePieceVocabulary)
        assert spm_features["targets"].vocabulary.vocab_size == 384
    finally:
        gin.clear_config()

    process, cli_model = spm_cli_run
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "vocab_size=384" in out and cli_model.exists()
    cli_vocab = olmax_tasks.spm_vocabulary(cli_model)
    assert cli_vocab.decode(cli_vocab.encode(text)) == text


@pytest.mark.parametrize("mode", ["file", "line"])
def test_files_that_are_not_utf8_text_are_skipped_with_a_warning(tmp_path, capfd, mode):
    """Issue 13.3: binary, Latin-1 and UTF-16 files never reach training as U+FFFD noise;
    each is named on stderr. Valid UTF-8 (a real U+FFFD included) is kept as it is."""
    from olmax_tasks import sources

    (tmp_path / "good.txt").write_text("Good café text.\r\nline two\n", encoding="utf-8")
    (tmp_path / "fffd.txt").write_text("a real \ufffd character\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("Café in Latin-1\n".encode("latin-1"))
    (tmp_path / "utf16.txt").write_bytes("hello in UTF-16\n".encode("utf-16"))
    (tmp_path / "image.bin").write_bytes(bytes(range(256)) * 4)
    files = sorted(str(p) for p in tmp_path.iterdir())
    ds = sources.documents_dataset(sources.SplitFiles(files=files, document_mode=mode))
    texts = _texts(ds)
    if mode == "file":
        assert sorted(texts) == ["Good café text.\nline two\n", "a real \ufffd character\n"]
    else:
        assert sorted(texts) == ["Good café text.", "a real \ufffd character", "line two"]
    err = capfd.readouterr().err
    for name in ("latin1.txt", "utf16.txt", "image.bin"):
        assert f"WARNING: skipping {'file' if mode == 'file' else 'a line of'} {tmp_path / name}: not UTF-8 text" in err
    assert "good.txt" not in err and "fffd.txt" not in err and "iconv" in err


def test_a_pattern_from_the_environment_is_named_as_coming_from_there(no_text_env, clean_gin, tmp_path):
    """Issue 23: OLMAX_TEXT_FILES, forgotten in the shell, gave a message that did not name it."""
    missing = str(tmp_path / "nope" / "*.txt")
    no_text_env.setenv(text_files_task.TRAIN_FILES_ENV, missing)
    with pytest.raises(FileNotFoundError) as info:
        seqio.get_mixture_or_task("text_files").get_dataset({"targets": 32}, split="train")
    assert f"the pattern comes from the environment variable OLMAX_TEXT_FILES={missing!r} (fix or unset it)" in str(
        info.value)
    gin.parse_config_files_and_bindings(None, [f"olmax_tasks.text_files.train_patterns = {[missing]!r}"])
    with pytest.raises(FileNotFoundError) as info:
        seqio.get_mixture_or_task("text_files").get_dataset({"targets": 32}, split="train")
    assert "comes from the environment" not in str(info.value)  # a Gin binding wins, and is not blamed on the shell


def test_only_empty_files_are_named_for_both_splits(no_text_env, tmp_path):
    """Issue 23: text_files whose only file is empty gave a message about the validation split."""
    (tmp_path / "empty.txt").write_text("")
    task = olmax_tasks.register_text_files_task("test_empty", str(tmp_path / "empty.txt"))
    for split in ("train", "validation"):
        with pytest.raises(ValueError) as info:
            task.get_dataset({"targets": 32}, split=split)
        assert str(info.value).startswith(f"The only file of test_empty train ('{tmp_path / 'empty.txt'}') is empty: "
                                          "there is no text to train on; add text or point the patterns at other files")
    (tmp_path / "text.txt").write_text("some text")
    task = olmax_tasks.register_text_files_task("test_some_empty", str(tmp_path / "*.txt"))
    assert _texts(task.source.get_dataset("train")) == ["some text"]  # one empty file among others is fine
