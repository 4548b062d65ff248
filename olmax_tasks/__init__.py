"""`olmax_tasks`: the former name of `olmax.tasks`, kept so that existing Gin files
(`import olmax_tasks`, `@olmax_tasks.byte_vocabulary()`), user task modules and
`python -m olmax_tasks.train_spm` keep working.

`import olmax_tasks` gives the module `olmax.tasks` itself (not a copy), and
`olmax_tasks.<submodule>` names the same module as `olmax.tasks.<submodule>`, so
every task and Gin configurable is registered once. New code: `from olmax import tasks`.
"""
import sys

from olmax import tasks as _tasks

for _name, _module in list(sys.modules.items()):
    if _name.startswith("olmax.tasks."):
        sys.modules.setdefault("olmax_tasks." + _name[len("olmax.tasks."):], _module)
# The import system hands out sys.modules["olmax_tasks"] once this file has run.
sys.modules[__name__] = _tasks
