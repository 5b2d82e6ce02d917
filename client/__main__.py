"""``python -m client``: the same as ``zchat`` (for a Python whose scripts are not on PATH)."""

from client.cli import main

raise SystemExit(main())
