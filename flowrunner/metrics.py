"""Prometheus metrics in the text exposition format, fed by run events."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from flowrunner.events import EventBus, RunEvent


def _labels(**labels: str) -> str:
    inner = ",".join(
        f'{key}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for key, value in labels.items()
    )
    return "{" + inner + "}"


class Metrics:
    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], int] = defaultdict(int)
        self.step_seconds: dict[str, float] = defaultdict(float)
        self.step_count: dict[str, int] = defaultdict(int)
        self.gauges: dict[str, Callable[[], float]] = {}

    def subscribe(self, bus: EventBus) -> None:
        bus.subscribe(self.on_event)

    def on_event(self, event: RunEvent) -> None:
        if event.kind != "run_finished":
            return
        self.runs[(event.run.flow, event.run.status)] += 1
        for step in event.run.steps:
            self.step_seconds[step.kind] += step.duration_ms / 1000
            self.step_count[step.kind] += 1

    def render(self) -> str:
        lines = [
            "# HELP flowrunner_runs_total Finished runs by flow and status.",
            "# TYPE flowrunner_runs_total counter",
        ]
        for (flow, status), count in sorted(self.runs.items()):
            lines.append(f"flowrunner_runs_total{_labels(flow=flow, status=status)} {count}")
        lines += [
            "# HELP flowrunner_step_duration_seconds Time spent in steps, by step kind.",
            "# TYPE flowrunner_step_duration_seconds summary",
        ]
        for kind in sorted(self.step_count):
            labels = _labels(kind=kind)
            lines.append(
                f"flowrunner_step_duration_seconds_sum{labels} {self.step_seconds[kind]:.6f}"
            )
            lines.append(f"flowrunner_step_duration_seconds_count{labels} {self.step_count[kind]}")
        for name, read in sorted(self.gauges.items()):
            lines += [f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"
