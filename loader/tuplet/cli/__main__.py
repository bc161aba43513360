"""`python -m tuplet.cli`: the `tuplet` command."""
import sys

from tuplet.cli.main import main

sys.exit(main())
