"""The ``softprompt`` command line: train, eval, predict, demo, distill, models, serve.

Every command takes ``--model`` (an embedded alias such as ``smollm2-135m``, a local model
folder, or a hub id for users who have the hub) and either a built-in ``--task`` or your
own files (``--train-file``/``--test-file`` with ``--field``, ``--label-column``,
``--template`` and ``--verbalizer``).

The commands live in one module per concept and register on the one shared ``app``
(``common``); importing them here, in this order, is what adds them, in the order
``softprompt --help`` lists them.
"""
from __future__ import annotations

from .common import _device, _files_name, _verbalizer, app, default_instruction, default_template
from .launch import _free_port, launch_command
from . import train, distill, serve, catalog, compare, prompts  # noqa: E402,F401  (registers the commands)

__all__ = ["app", "main", "launch_command", "_free_port", "_device", "_files_name", "_verbalizer",
           "default_instruction", "default_template"]


def main() -> None:  # pragma: no cover
    app()
