"""A notifier: when a task completes, or fails for good (no retry follows), it posts a
Slack-compatible message (``{"text": "..."}``) to the configured URL (a Slack incoming
webhook, Mattermost, Rocket.Chat, or anything that takes that JSON).

Options: ``CCC_PLUGIN_EXAMPLE_NOTIFIER_URL`` (required, http or https),
``CCC_PLUGIN_EXAMPLE_NOTIFIER_TIMEOUT_HTTP`` (seconds, default 5).

It runs in its own thread (the cluster's plugin guard): a plain blocking ``urllib``
request is fine here. A post that fails raises: the guard logs and counts it, and the
cluster goes on.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlsplit

from events.task import TaskCompleted, TaskFailed, TaskMerged
from events.task_state import TaskState


class SlackNotifier:
    def __init__(self, options: Mapping[str, str]) -> None:
        url = options.get("url", "")
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ValueError("CCC_PLUGIN_EXAMPLE_NOTIFIER_URL must be an http(s) URL")
        self.url = url
        self.timeout = float(options.get("timeout_http", "5"))
        self.sent = 0

    def on_event(self, seq: int, event: object, state: object) -> None:
        if not isinstance(state, TaskState):
            return
        if isinstance(event, TaskCompleted | TaskMerged) and state.status == "completed":
            self.post(self.text(state, "completed", event.reason if isinstance(event, TaskCompleted) else "merged"))
        elif isinstance(event, TaskFailed) and state.status == "failed" and not state.can_retry:
            where = f" in {event.phase}" if event.phase else ""
            self.post(self.text(state, "failed", f"{event.reason}{where}"))

    @staticmethod
    def text(task: TaskState, outcome: str, why: str) -> str:
        issue = task.issue
        pr = f" — {task.pr_url}" if task.pr_url else ""
        mark = ":white_check_mark:" if outcome == "completed" else ":x:"
        return f"{mark} task `{task.task_id}` {outcome}: {issue.repo}#{issue.number} {issue.title} ({why}){pr}"

    def post(self, text: str) -> None:
        body = json.dumps({"text": text}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - configured URL
            if not 200 <= response.status < 300:
                raise RuntimeError(f"{self.url} answered {response.status}")
        self.sent += 1
