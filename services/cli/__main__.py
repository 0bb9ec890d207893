"""``python -m services.cli`` — the same as the ``optmon`` command."""

from services.cli.main import main

raise SystemExit(main())
