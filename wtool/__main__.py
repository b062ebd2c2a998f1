"""`python -m wtool` runs the CLI."""

from wtool.cli import main

main()
