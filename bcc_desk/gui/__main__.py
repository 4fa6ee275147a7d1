"""`python -m bcc_desk.gui [FOLDER]`: the same as the `bcc-desk` command."""

import sys

from bcc_desk.gui.app import main

sys.exit(main())
