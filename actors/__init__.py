"""Actors: the coordinator and agents (async loops over durable JetStream consumers)."""
