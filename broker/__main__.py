"""``python -m broker``: the same as ``zchat-broker`` (for a Python whose scripts are not on PATH)."""

from broker.cli import main

raise SystemExit(main())
