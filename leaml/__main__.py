"""``python -m leaml``: see leaml/cli/main.py."""
import sys

from leaml.cli.main import main

sys.exit(main())
