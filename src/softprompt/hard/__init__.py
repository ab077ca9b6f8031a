"""Hand-written prompts at their best (the hard side of a comparison): zero-shot, few-shot and
chain-of-thought templates, instruction search, nearest-neighbour demonstrations, the chat format."""
