"""The bottom layer: tasks and their data.

* :mod:`.task` -- :class:`Task`, :class:`TaskKind`, :class:`Example`, :class:`TaskData` and the data errors;
* :mod:`.grammar` -- the one template grammar (``{soft:N}``, ``{field}``, ``{{``/``}}``);
* :mod:`.loaders` -- user files (CSV, TSV, JSON lines), ``datasets``, and :func:`data_root`;
* :mod:`.builtin` -- the built-in tasks, defined as a table (``builtin_tasks.json``);
* :mod:`.hotpotqa` -- HotpotQA's context rule and reader; :mod:`.splits` -- validation hold-out.

The folder also holds the package's data files (``demo_support.csv``, ``instruction_patterns.json``).
"""
from .builtin import BUILTIN_TASKS, builtin_task, list_tasks, load_task
from .hotpotqa import HOTPOT_FILE, HOTPOT_MARKS_FILE, hotpot_context, hotpotqa_examples
from .loaders import data_root, from_hf_dataset, load_examples
from .splits import holdout_split
from .task import DataError, DataFileNotFoundError, DataNotFoundError, Example, Task, TaskData, TaskKind

__all__ = [
    "BUILTIN_TASKS", "DataError", "DataFileNotFoundError", "DataNotFoundError", "Example", "HOTPOT_FILE",
    "HOTPOT_MARKS_FILE", "Task", "TaskData", "TaskKind", "builtin_task", "data_root", "from_hf_dataset", "holdout_split",
    "hotpot_context", "hotpotqa_examples", "list_tasks", "load_examples", "load_task",
]
