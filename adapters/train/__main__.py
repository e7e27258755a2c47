"""``python -m loraserve.adapters.train ...``: the same as ``loraserve-train ...``."""

from .cli import main

raise SystemExit(main())
