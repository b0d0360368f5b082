"""`python -m turbostream ...` is the `turbostream` command."""

from .cli import entry

entry()
