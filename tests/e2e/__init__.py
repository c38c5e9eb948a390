"""Whole processes: the ``ccc`` command line, clusters, chaos, benches."""
