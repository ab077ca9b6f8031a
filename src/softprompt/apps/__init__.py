"""Applications built on the core: a comparison of every method and its report."""
