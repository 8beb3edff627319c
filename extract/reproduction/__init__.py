"""Reproducing the published results: the setups, the pipeline (download, convert, evaluate) and its tables."""
