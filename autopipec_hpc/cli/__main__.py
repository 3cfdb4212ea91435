"""``python -m autopipec_hpc.cli``: the same command as ``autopipec-hpc``."""

import sys

from autopipec_hpc.cli import main

sys.exit(main())
