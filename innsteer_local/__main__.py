"""`python -m innsteer_local`: the same command line as `innsteer-local`."""

from .apps.cli import main

main()
