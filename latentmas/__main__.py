"""`python -m latentmas ...` is the `latentmas` command."""

from latentmas.app.cli import main

main(prog_name="latentmas")
