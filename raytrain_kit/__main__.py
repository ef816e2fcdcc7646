"""`python -m raytrain_kit` is the `raytrain-kit` command."""

from raytrain_kit.cli import main

raise SystemExit(main())
