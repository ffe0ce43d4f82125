"""python -m builder.image: see the package's docstring."""

from .cli import main

raise SystemExit(main())
