"""``python -m leaml``: thin argparse commands, one module per group, none importing another (shared helpers in common.py). Imports anything below."""
