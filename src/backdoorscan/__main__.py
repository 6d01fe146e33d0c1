"""`python -m backdoorscan`."""

from .cli import main

main()
