"""`python -m turbostream ...` is the `turbostream` command."""

import sys

from .cli import main

sys.exit(main())
