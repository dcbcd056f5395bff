"""
A few Prometheus metrics, rendered in the text exposition format.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

#: Latency buckets, in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Counter:
    """
    A monotonically increasing count.
    """

    kind = "counter"

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def samples(self) -> list[str]:
        return [f"{self.name} {self.value}"]


class LabelledCounter:
    """
    A counter per value of one label.
    """

    kind = "counter"

    def __init__(self, name: str, help: str, label: str) -> None:
        self.name = name
        self.help = help
        self.label = label
        self.values: dict[str, int] = {}

    def inc(self, value: str, amount: int = 1) -> None:
        self.values[value] = self.values.get(value, 0) + amount

    def samples(self) -> list[str]:
        out = []
        for value, count in sorted(self.values.items()):
            escaped = (
                value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            )
            out.append(f'{self.name}{{{self.label}="{escaped}"}} {count}')
        return out


class Gauge:
    """
    A value read from a callable when metrics are rendered.
    """

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name = name
        self.help = help
        self.read = read

    def samples(self) -> list[str]:
        return [f"{self.name} {self.read()}"]


class ReadCounter(Gauge):
    """
    A count that only grows, kept elsewhere and read from a callable when
    metrics are rendered.
    """

    kind = "counter"


class Histogram:
    """
    Observations counted into fixed buckets.
    """

    kind = "histogram"

    def __init__(
        self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> None:
        self.name = name
        self.help = help
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def samples(self) -> list[str]:
        out = []
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum {self.total}")
        out.append(f"{self.name}_count {self.count}")
        return out


class Metrics:
    """
    A set of metrics with a common name prefix.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._metrics: list[Counter | LabelledCounter | Gauge | Histogram] = []

    def counter(self, name: str, help: str) -> Counter:
        metric = Counter(f"{self.prefix}_{name}", help)
        self._metrics.append(metric)
        return metric

    def labelled_counter(self, name: str, help: str, label: str) -> LabelledCounter:
        metric = LabelledCounter(f"{self.prefix}_{name}", help, label)
        self._metrics.append(metric)
        return metric

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> Gauge:
        metric = Gauge(f"{self.prefix}_{name}", help, read)
        self._metrics.append(metric)
        return metric

    def read_counter(self, name: str, help: str, read: Callable[[], float]) -> Gauge:
        metric = ReadCounter(f"{self.prefix}_{name}", help, read)
        self._metrics.append(metric)
        return metric

    def histogram(self, name: str, help: str) -> Histogram:
        metric = Histogram(f"{self.prefix}_{name}", help)
        self._metrics.append(metric)
        return metric

    def include(self, other: Metrics) -> None:
        """
        Render C{other}'s metrics with these (a part that counts its own).
        """
        self._metrics.extend(other._metrics)

    def render(self) -> bytes:
        """
        The Prometheus text format of every metric.
        """
        lines = []
        for metric in self._metrics:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            lines.extend(metric.samples())
        return ("\n".join(lines) + "\n").encode("utf-8")
