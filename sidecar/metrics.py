"""Prometheus metrics the contract names; project_id and session_id are constant labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LABELS = ("project_id", "session_id")


class Metrics:
    """One registry per sidecar instance (tests make many); metrics pre-bound to our labels."""

    def __init__(self, project_id: str = "local", session_id: str = "local") -> None:
        self.registry = CollectorRegistry()
        ids = (project_id, session_id)
        r = self.registry

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, _LABELS + extra, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _LABELS, registry=r).labels(*ids)

        self._ids = ids
        self.hydration_seconds = Histogram(
            "sidecar_hydration_duration_seconds",
            "Wall time of a hydration",
            _LABELS,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        ).labels(*ids)
        self.hydration_bytes = counter(
            "sidecar_hydration_bytes", "Compressed bytes downloaded for snapshots"
        ).labels(*ids)
        self.hydration_files = counter(
            "sidecar_hydration_files", "Files written or verified by hydrations"
        ).labels(*ids)
        self.hydrations = counter("sidecar_hydrations", "Hydrations by outcome", ("outcome",))
        self.snapshot_retries = counter(
            "sidecar_snapshot_retries", "Snapshot download retries"
        ).labels(*ids)
        self.events = counter(
            "sidecar_events",
            "Delta events by type and outcome "
            "(applied, duplicate, stale, rejected, buffered, noop)",
            ("event", "outcome"),
        )
        self.apply_lag = Histogram(
            "sidecar_apply_lag_seconds",
            "Event timestamp to file on disk",
            _LABELS,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
            registry=r,
        ).labels(*ids)
        self.last_applied = gauge(
            "sidecar_last_applied_timestamp_seconds", "Unix time of the last applied event"
        )
        self.last_seq = gauge("sidecar_last_seq", "Highest applied event seq")
        self.connected = gauge("sidecar_realtime_connected", "1 while the channel is joined")
        self.reconnects = counter(
            "sidecar_realtime_reconnects", "Realtime client rebuilds and rejoins"
        ).labels(*ids)
        self.resyncs = counter("sidecar_resyncs", "Resyncs by reason", ("reason",))
        self.conflicts = counter(
            "sidecar_conflicts", "Two-way sync conflicts by policy", ("policy",)
        )
        self.local_changes = counter(
            "sidecar_local_changes", "Local changes seen by outcome", ("outcome",)
        )
        self.project_bytes = gauge("sidecar_project_bytes", "Bytes in the project tree")
        self.project_files = gauge("sidecar_project_files", "Files in the project tree")
        self.quota_bytes = gauge("sidecar_quota_bytes", "SIDECAR_MAX_BYTES (0 = unlimited)")
        self.quota_refusals = counter(
            "sidecar_quota_refusals", "Changes refused by the quota", ("source",)
        )
        self.child_restarts = counter("sidecar_child_restarts", "Child restarts").labels(*ids)
        self.ready = gauge("sidecar_ready", "1 while /readyz answers 200")

    def event(self, event: str, outcome: str) -> None:
        """Count one delta event by type and outcome."""
        self.events.labels(*self._ids, event, outcome).inc()

    def inc(self, counter: Counter, *labels: str) -> None:
        """Increment a labelled counter with our constant labels first."""
        counter.labels(*self._ids, *labels).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
