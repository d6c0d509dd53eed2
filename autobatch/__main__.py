"""`python -m autobatch` = the `autobatch` command."""

from autobatch.cli import main

raise SystemExit(main())
