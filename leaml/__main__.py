"""``python -m leaml``: see leaml/cli.py."""
import sys

from leaml.cli import main

sys.exit(main())
