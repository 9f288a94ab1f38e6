"""`python -m alignlib` is the `alignlib` command."""

import sys

from alignlib.cli import main

sys.exit(main())
