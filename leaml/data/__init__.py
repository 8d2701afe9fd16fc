"""Data in and out of a project: import (manifests, parquet, folders, zips) and its checks, export, the label split, the bundled demo set. Imports leaml.store and leaml.config only."""
