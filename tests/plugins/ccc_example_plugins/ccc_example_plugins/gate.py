"""An assignment policy: tasks of issues labelled ``hold`` are not assigned (vetoed,
asked again later), those labelled ``later`` wait ``DELAY_SECONDS`` first; the tracking
comment says so.

Options: ``CCC_PLUGIN_EXAMPLE_LABEL_GATE_VETO_LABEL`` (default ``hold``),
``..._DELAY_LABEL`` (default ``later``), ``..._DELAY_SECONDS`` (default 60).
"""

from __future__ import annotations

from collections.abc import Mapping

from actors.plugins import ALLOW, Allow, Delay, Veto
from events.agent_state import AgentState
from events.task_state import TaskState


class LabelGate:
    def __init__(self, options: Mapping[str, str]) -> None:
        self.veto_label = options.get("veto_label", "hold")
        self.delay_label = options.get("delay_label", "later")
        self.delay = float(options.get("delay_seconds", "60"))

    async def assignment(self, task: TaskState, agent: AgentState) -> Allow | Veto | Delay:
        labels = task.issue.labels
        if self.veto_label in labels:
            return Veto(f"the issue is labelled {self.veto_label!r}")
        if self.delay_label in labels:
            return Delay(self.delay, f"the issue is labelled {self.delay_label!r}")
        return ALLOW

    def tracking_comment(self, task: TaskState) -> str | None:
        if self.veto_label in task.issue.labels and task.status == "queued":
            return f"On hold: remove the `{self.veto_label}` label to let an agent take it."
        return None
