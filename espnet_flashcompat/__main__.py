"""``python -m espnet_flashcompat doctor [--json]``: the ``espnet-flashcompat`` command."""

import sys

from espnet_flashcompat.cli import main

sys.exit(main())
