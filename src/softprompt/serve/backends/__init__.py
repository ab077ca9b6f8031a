"""Serving backends other than the in-process :class:`~softprompt.serve.engine.Engine`.

A backend is anything with the Engine's surface that the HTTP app (``app.py``) and the
prompt folder (``registry.py``) use: ``register`` / ``unregister`` / ``tasks`` / ``task``,
``submit_classify`` / ``submit_generate`` returning ``concurrent.futures.Future`` s,
``start`` / ``stop`` / ``alive`` / ``queued_rows``, ``decode``, ``metrics``, ``identity``
and ``base_name``.  The in-process Engine stays the default; ``vllm.py`` sends the model
work to vLLM (in this process, or to remote vLLM OpenAI servers) as input embeddings.
"""
from __future__ import annotations

BACKENDS = ("engine", "vllm")
