"""`python -m acestep_daemon` is the `acestep` command."""

from acestep_daemon.cli import main

raise SystemExit(main())
