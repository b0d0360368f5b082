"""`python -m turbostream.cli ...` is the `turbostream` command too."""

from . import entry

entry()
