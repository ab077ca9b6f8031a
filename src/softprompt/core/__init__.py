"""The primitives every layer above shares: templates, prompt artifacts, the prompt bank,
conditioning a frozen model on prompts, scoring, calibration, atomic writes."""
