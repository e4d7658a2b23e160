"""`python -m relayaudit`: runs the command line, exactly like the `relayaudit` script."""

from relayaudit.cli import main

raise SystemExit(main())
