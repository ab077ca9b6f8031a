"""Training: one loop (``loop.fit``) over a :class:`~softprompt.training.loop.Trainable`, its
checkpoints (``checkpoint.py``) and its run configuration (``config.py``)."""
