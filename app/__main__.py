"""`python -m app [flags]`: the same as `llamaserve serve [flags]`."""

import sys

from app.cli import main

sys.exit(main())
