"""`python -m tests.chaos`: see tests/chaos/suite.py."""

import sys

from tests.chaos.suite import main

sys.exit(main())
