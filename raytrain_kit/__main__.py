"""`python -m raytrain_kit` is the `raytrain-kit` command."""

from raytrain_kit.cli import run

run()
