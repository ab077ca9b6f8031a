"""``python -m softprompt.cli``: the same command line as ``python -m softprompt``."""
from . import main

main()
