"""``python -m interp`` (and ``torchrun --nproc_per_node N -m interp capture ...``): the CLI."""

from interp.cli import main

raise SystemExit(main())
