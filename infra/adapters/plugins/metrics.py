"""The plugins' metrics in this process (measurements of this process, not facts of
the log, like :mod:`infra.adapters.obs.metrics`): every guarded call by outcome, how
long they take, and whether each plugin is taking calls (its circuit closed)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PLUGIN_CALL_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class PluginMetrics:
    """``claude_plugin_calls_total{plugin,hook,outcome}`` (outcome: ok, error, timeout,
    invalid, busy, open, dropped), ``claude_plugin_call_duration_seconds{plugin,hook}``,
    ``claude_plugin_healthy{plugin}`` (1: loaded and its circuit closed) and
    ``claude_plugin_queue_depth{plugin}`` (events waiting for its event hook)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.calls = Counter("claude_plugin_calls", "Plugin hook calls in this process, by outcome",
                             ["plugin", "hook", "outcome"], registry=self.registry)
        self.duration = Histogram("claude_plugin_call_duration_seconds",
                                  "Plugin hook call duration (answered or timed out)", ["plugin", "hook"],
                                  registry=self.registry, buckets=PLUGIN_CALL_BUCKETS)
        self.healthy = Gauge("claude_plugin_healthy", "1 when the plugin is loaded and its circuit is closed",
                             ["plugin"], registry=self.registry)
        self.queue_depth = Gauge("claude_plugin_queue_depth", "Events waiting for the plugin's event hook",
                                 ["plugin"], registry=self.registry)
