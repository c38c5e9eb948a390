"""``ccc bench``: the store and dispatch benchmarks, each beside a raw baseline measured
in the same run."""
