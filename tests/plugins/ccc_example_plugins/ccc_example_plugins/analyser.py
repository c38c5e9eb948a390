"""An analyser plugin (``ccc.analysers``): the built-in rules, and an issue labelled
``urgent`` gets priority ``urgent`` whatever the rules said. And, for the tests of the
Protocol check, something that is not a coder."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from actors.analysis import RuleAnalyser
from events.task import Analysis, IssueRef


class RulesPlus:
    name = "example-rules-plus"

    def __init__(self, options: Mapping[str, str]) -> None:
        self.rules = RuleAnalyser()
        self.label = options.get("urgent_label", "urgent")

    async def analyse(self, issue: IssueRef) -> Analysis:
        analysis = await self.rules.analyse(issue)
        if self.label in issue.labels:
            return msgspec.structs.replace(analysis, priority="urgent",
                                           reasons=(*analysis.reasons, f"label {self.label!r}: urgent (plugin)"))
        return analysis


class NotACoder:
    def __init__(self, options: Mapping[str, str]) -> None:
        pass

    def implement(self, request, workspace):  # a coder's implement is async (and it has a name)
        return None
