"""``python -m softprompt``: the command line, also what ``accelerate launch -m softprompt train ...`` runs."""
from .cli import main

main()
