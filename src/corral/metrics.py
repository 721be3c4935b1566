"""Prometheus metrics, served at ``/metrics``.

Each service instance has its own registry (passed explicitly, never the global one), so
tests and several apps in one process do not share counters. Counters and histograms are
observed where things happen; gauges of current state (active runs, queued inputs,
observers) are read from the kernel at scrape time, so the hot paths pay nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

# (name, help, labels) of gauges read at scrape time from a snapshot function.
Snapshot = Callable[[], dict[str, Any]]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs_ended = Counter("corral_runs_ended", "Runs that ended, by final status", ["status"], registry=r)
        self.inputs_rejected = Counter("corral_inputs_rejected", "Messages refused (409 reject, 429 too many)",
                                       ["reason"], registry=r)
        self.lane_wait = Histogram("corral_lane_wait_seconds", "From a run's acceptance to its start",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.provider_slot_wait = Histogram("corral_provider_slot_wait_seconds", "Waiting for a model-call slot",
                                            ["priority"], buckets=LATENCY_BUCKETS, registry=r)
        self.tool_slot_wait = Histogram("corral_tool_slot_wait_seconds", "Waiting for a tool-process slot",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.model_call = Histogram("corral_model_call_seconds", "Model calls, from slot to last token",
                                    ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.tool_call = Histogram("corral_tool_call_seconds", "Tool calls", ["tool"], buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.events_appended = Counter("corral_events_appended", "Events committed to session logs", registry=r)
        self.commit_batch = Histogram("corral_commit_batch_units", "Units per group commit", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.commit_latency = Histogram("corral_commit_seconds", "Duration of one group commit",
                                        buckets=LATENCY_BUCKETS, registry=r)
        # A cluster's node (DESIGN.md section 6); zero on one node.
        self.forwarded_requests = Counter("corral_forwarded_requests", "Requests sent on to the node that owns "
                                          "their session", ["outcome"], registry=r)
        self.ownership_acquisitions = Counter("corral_ownership_acquisitions",
                                              "Sessions this node took from nobody (new, freed, or a dead node's)",
                                              registry=r)
        self.takeovers = Counter("corral_takeovers", "Dead nodes this node took over", registry=r)
        self.fenced_commits = Counter("corral_fenced_commits", "Commits refused because this node lost its lease",
                                      registry=r)
        self.scheduler_lag = Histogram("corral_scheduler_lag_seconds", "From a job's due time to its fire",
                                       buckets=LATENCY_BUCKETS, registry=r)

    def watch(self, snapshot: Snapshot) -> None:
        """Expose the current-state gauges that ``snapshot()`` reports at each scrape."""
        self.registry.register(_StateCollector(snapshot))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, snapshot: Snapshot):
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # collected only at scrape time: describing would call the snapshot at registration

    def collect(self) -> Iterator[Metric]:
        state = self._snapshot()
        yield GaugeMetricFamily("corral_runs_active", "Runs running or waiting", value=state["active_runs"])
        queued = GaugeMetricFamily("corral_inputs_queued", "Accepted inputs not yet taken by a run",
                                   labels=["class"])
        for klass, count in state["queued_by_class"].items():
            queued.add_metric([klass], count)
        yield queued
        yield GaugeMetricFamily("corral_observers", "Event-stream observers connected", value=state["observers"])
        yield GaugeMetricFamily("corral_observer_catch_ups", "Times a slow observer caught up from the store",
                                value=state["catch_ups"])
        yield GaugeMetricFamily("corral_sessions_live", "Sessions held in memory", value=state["sessions_live"])
        yield GaugeMetricFamily("corral_store_writable", "1 unless the store's last write attempt failed "
                                "(a full disk, an unreachable database)", value=int(state["store_writable"]))
        yield GaugeMetricFamily("corral_ready", "1 when GET /readyz would answer 200", value=int(state["ready"]))
