import sys

from antiphon.daemon.cli import main

sys.exit(main())
