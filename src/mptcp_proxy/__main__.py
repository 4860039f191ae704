"""`python -m mptcp_proxy` runs the CLI."""

import sys

from mptcp_proxy.cli.main import main

sys.exit(main())
