"""``python -m stagewise`` runs the command line."""

from stagewise.cli.main import main

main()
