"""``python -m fusedkd.distill``: see `fusedkd.distill.cli`."""

import sys

from fusedkd.distill.cli import main

sys.exit(main())
