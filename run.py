#!/usr/bin/env python
"""Seed-compatible entry point: `python run.py --method latent_mas --model_name ... --task gsm8k ...`.

Same as `latentmas run`; see `python run.py --help`.
"""

from latentmas.app.cli import run_command

if __name__ == "__main__":
    run_command(prog_name="run.py")
