"""``python -m drp_train`` runs the ``drp`` command."""
from .cli import main

raise SystemExit(main())
