"""``python -m hetmoe_compile``."""

import sys

from .cli.app import main

sys.exit(main())
