"""Olmax's seqio tasks: the package `olmax.tasks` (also importable as `olmax_tasks`).

`from olmax import tasks` registers, without reading any data:

    olmax_stdlib   Python's standard library, byte vocabulary (offline default)
    olmax_recall   synthetic multi-query associative recall (recall.py), and its sized variants
    text_files     local text files from Gin / OLMAX_TEXT_FILES (text_files_task.py)
    c4_en_bytes, c4_en_spm, lm1b_bytes   prepared TFDS datasets (tfds_tasks.py)

All are decoder-only LM tasks with one feature, 'targets' (int32, EOS at the
end of each document, split into pieces of the sequence length; see
preprocessors.py), meant for `seqio.DecoderFeatureConverter(pack=True)`.
Byte-vocabulary models use `BYTE_VOCAB_SIZE` (= 384) embedding rows.

Importing again, or calling a `register_*` function again, replaces the task
instead of raising.

What a trainer does:
    from olmax import tasks                    # before parsing Gin (configurables)
    tasks.import_task_module(MIXTURE_OR_TASK_MODULE)         # user's module, if any
    task = tasks.get_task_or_mixture(MIXTURE_OR_TASK_NAME)
    ds = task.get_dataset({'targets': 1024}, split='train', shuffle=True,
                          seed=seed, shard_info=seqio.ShardInfo(index, count),
                          num_epochs=None)
"""

from .files import VALIDATION_FRACTION
from .registry import add_lm_task
from .registry import get_task_or_mixture
from .registry import import_task_module
from .registry import LazyVocabularyTask
from .registry import registered_names
from .sources import DOCUMENT_MODES
from .sources import TextFileSource
from .vocab import BYTE_VOCAB_IDS
from .vocab import BYTE_VOCAB_SIZE
from .vocab import byte_vocabulary
from .vocab import get_vocabulary
from .vocab import padded_vocab_size
from .vocab import spm_model_path
from .vocab import spm_vocabulary

# Importing these modules registers their tasks.
from . import recall
from . import stdlib
from . import text_files_task
from . import tfds_tasks

from .recall import RECALL_TASK
from .recall import answer_mask
from .recall import recall_example
from .recall import register_recall_task
from .stdlib import STDLIB_TASK
from .stdlib import register_stdlib_task
from .text_files_task import TEXT_FILES_TASK
from .text_files_task import register_text_files_task
from .text_files_task import text_files_config

# The Gin configurables under the names Gin files and flags use. Their Gin module
# stays `olmax_tasks` (the package's former name, still an alias of this one), so
# `olmax_tasks.text_files.*` / `olmax_tasks.spm_model.*` bindings work in plain Gin
# files and, being package attributes, in files with `dynamic_registration`.
text_files = text_files_config
spm_model = spm_model_path
from .tfds_tasks import register_tfds_text_task
