"""Training: one loop (``loop.fit``) over a :class:`~softprompt.training.loop.Trainable`, its
checkpoints (``checkpoint.py``) and its run configuration (``config.py``); the one default recipe
(``recipe.py``: optimizer, learning-rate rule, stopping, collapse), the learning-rate search and
collapse guard on top of it (``search.py``), and the one rule that ranks trained prompts
(``selection.py``)."""
