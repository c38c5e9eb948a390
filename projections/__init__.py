"""Projections: pure folds of the event log into views (task board, agent table,
cluster load), their KV materialisation and the read-only status API."""

from projections.read_model import ClusterView, ReadModel

__all__ = ["ClusterView", "ReadModel"]
