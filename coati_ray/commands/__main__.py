"""`python -m coati_ray.commands`: the `coati` command without its console script."""

import sys

from coati_ray.commands import main

sys.exit(main())
