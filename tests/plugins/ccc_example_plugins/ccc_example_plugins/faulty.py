"""A plugin that misbehaves on purpose, for the tests of the cluster's plugin guard: every
hook raises (``MODE=raise``), never returns (``hang``), takes ``SLOW_SECONDS`` (``slow``,
default 1), returns nonsense (``nonsense``) or allows (``ok``); ``START_SECONDS`` makes
its factory that slow.

Option: ``CCC_PLUGIN_EXAMPLE_FAULTY_MODE``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

MODES = ("raise", "hang", "slow", "nonsense", "ok")


class Faulty:
    def __init__(self, options: Mapping[str, str]) -> None:
        self.mode = options.get("mode", "raise")
        if self.mode not in MODES:
            raise ValueError(f"MODE must be one of {', '.join(MODES)}")
        self.slow = float(options.get("slow_seconds", "1"))
        time.sleep(float(options.get("start_seconds", "0")))  # a factory that takes its time
        self.calls = 0
        self.released = threading.Event()

    def _misbehave(self):
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("the faulty plugin fails, as asked")
        if self.mode == "hang":
            self.released.wait()  # blocks until close(): only this plugin's thread waits
        if self.mode == "slow":
            time.sleep(self.slow)
        if self.mode == "nonsense":
            return {"allow": "maybe"}
        return None

    def on_event(self, seq, event, state):
        self._misbehave()

    def assignment(self, task, agent):
        return self._misbehave()

    def pull_request(self, task, files, draft):
        return self._misbehave()

    def tracking_comment(self, task):
        result = self._misbehave()
        return result if result is None else 42

    def close(self):
        self.released.set()  # the cluster stops: let a hung call end
