"""``python -m ranksearch``: the `ranksearch` command line."""

from .cli import main

raise SystemExit(main())
