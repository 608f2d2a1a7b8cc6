"""`python -m ckptflow ...`, the same as the `ckptflow` command."""

from ckptflow.cli import main

raise SystemExit(main())
