"""`python -m antiphon` is the `antiphon` command."""

import sys

from antiphon.daemon.cli import main

sys.exit(main())
