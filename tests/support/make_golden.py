"""Regenerate the golden event log (run deliberately, then review the diff):

    python -m tests.support.make_golden               # a new log from a demo run
    python -m tests.support.make_golden --reproject   # same log, projection by the current code

It runs ``ccc demo``'s flow on a throwaway server, copies the raw event log (bytes as
stored) to ``tests/fixtures/golden_events.jsonl``, appends two poison messages, and
records the projection of that log in ``tests/fixtures/golden_projection.json``.
``tests/unit/test_golden.py`` re-projects the stored log with the current code in CI: a
change that cannot read old events, or folds them differently, fails there."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import msgspec

from events.codec import decode_or_bad
from events.subjects import Namespace
from infra.shell.app.demo import run_demo
from infra.adapters.nats.settings import load_settings
from projections.read_model import ReadModel

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
POISON = [
    ("ccc.task.demo_shop-1.created", b"this is not json"),
    ("ccc.task.demo_shop-2.created", b'{"type":"task.teleported","task_id":"demo_shop-2"}'),
]


def project(lines: list[dict]) -> ReadModel:
    model = ReadModel()
    for line in lines:
        subject, data = line["subject"], line["data"].encode()
        model.apply(line["seq"], decode_or_bad(line["seq"], subject, subject.split(".", 1)[1], data))
    return model


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = msgspec.structs.replace(load_settings(data_dir=tmp), nats_url=None)
        ns = Namespace("ccc")
        lines: list[dict] = []

        async def keep_log(cluster) -> None:
            def on_msg(seq: int, subject: str, data: bytes) -> None:
                lines.append({"seq": seq, "subject": subject, "data": data.decode()})
            await cluster.coordinator.store._consume(on_msg, filter_subject=None, from_seq=1,
                                                     until_seq=None, follow=False)

        ok, _, _ = await run_demo(settings, ns, before_stop=keep_log)
        assert ok, "the demo did not finish"
    for subject, data in POISON:
        lines.append({"seq": lines[-1]["seq"] + 1, "subject": subject, "data": data.decode()})
    FIXTURES.mkdir(exist_ok=True)
    with open(FIXTURES / "golden_events.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line, sort_keys=True) + "\n")
    snapshot = project(lines).snapshot()
    (FIXTURES / "golden_projection.json").write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")
    print(f"{len(lines)} events; {len(snapshot['tasks'])} tasks, {len(snapshot['agents'])} agents")


def reproject() -> None:
    """Keep the recorded log, record its projection by the current code (for a deliberate
    change of how the log is folded: review the diff of golden_projection.json)."""
    lines = [json.loads(line) for line in (FIXTURES / "golden_events.jsonl").read_text().splitlines()]
    snapshot = project(lines).snapshot()
    (FIXTURES / "golden_projection.json").write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    import sys

    reproject() if "--reproject" in sys.argv else asyncio.run(main())
