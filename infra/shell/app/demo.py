"""``ccc demo``: the whole issue -> pull request flow on a sample repository, with
no API key and no network. A real nats-server, the real coordinator and agents, real
git; the coding is replayed by the scripted coder from recorded sessions.

The sample: a small shop library with stdlib tests, and four issues
  #1 backend   "Cart total ignores quantity"               -> fixed, tests pass
  #2 frontend  "Checkout button invisible on dark theme"   -> CSS change
  #3 docs      "Document the discount rules"               -> depends on #4: waits for it
  #4 backend   "Bulk discount over 10 items"               -> tests fail first, retried, passes
The demo plays the reviewer too: every pull request that comes up is merged (as
``ccc pr merge`` does), so each task ends Completed and #3 can start after #4.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from events.codec import encode
from events.issue import IssueOpened, IssuePullRequestMerged
from events.trust import OPERATOR
from events.subjects import Namespace, task_id_for

from infra.shell.app.cluster import ClusterOptions, LocalCluster
from infra.adapters.forge.local import LocalForge
from infra.adapters.nats.settings import Settings

REPO = "demo/shop"
TEST_COMMAND = "python3 -m unittest discover -s tests -v\n"

FILES = {
    "README.md": "# shop\n\nA tiny shop library.\n",
    "shop/__init__.py": "",
    "shop/cart.py": (
        "def cart_total(items):\n"
        '    """items: list of (unit_price, quantity)."""\n'
        "    return sum(price for price, quantity in items)\n"
    ),
    "shop/pricing.py": (
        "def bulk_discount(quantity, price):\n"
        '    """Price for `quantity` units."""\n'
        "    return quantity * price\n"
    ),
    "web/style.css": "body { background: #111; }\n.checkout { color: #111; }\n",
    "tests/__init__.py": "",
    "tests/test_cart.py": (
        "import unittest\n\nfrom shop.cart import cart_total\n\n\n"
        "class CartTest(unittest.TestCase):\n"
        "    def test_empty(self):\n        self.assertEqual(cart_total([]), 0)\n\n"
        "    def test_single(self):\n        self.assertEqual(cart_total([(5, 1)]), 5)\n"
    ),
    "tests/test_pricing.py": (
        "import unittest\n\nfrom shop.pricing import bulk_discount\n\n\n"
        "class PricingTest(unittest.TestCase):\n"
        "    def test_small_order(self):\n        self.assertEqual(bulk_discount(2, 10), 20)\n"
    ),
    ".ccc/test-command": TEST_COMMAND,
}

BULK_TEST = (
    "\n\nclass BulkTest(unittest.TestCase):\n"
    "    def test_ten_percent_over_ten(self):\n"
    "        self.assertEqual(bulk_discount(20, 10), 180)\n"
)


def _attempt(summary: str, *steps: dict) -> dict:
    return {"summary": summary, "steps": list(steps)}


def _edit(path: str, old: str, new: str) -> dict:
    return {"edit": {"path": path, "old": old, "new": new}}


SCRIPTS = {
    1: [_attempt(
        "cart_total now multiplies unit price by quantity; test added.",
        _edit("shop/cart.py", "sum(price for price, quantity in items)",
              "sum(price * quantity for price, quantity in items)"),
        _edit("tests/test_cart.py", "self.assertEqual(cart_total([(5, 1)]), 5)\n",
              "self.assertEqual(cart_total([(5, 1)]), 5)\n\n"
              "    def test_quantity(self):\n        self.assertEqual(cart_total([(5, 3), (2, 2)]), 19)\n"),
    )],
    2: [_attempt(
        "The checkout button uses a light colour on the dark background.",
        _edit("web/style.css", ".checkout { color: #111; }", ".checkout { color: #f5f5f5; background: #2a6; }"),
    )],
    3: [_attempt(
        "README documents the bulk discount.",
        _edit("README.md", "A tiny shop library.\n",
              "A tiny shop library.\n\n## Discounts\n\nOrders over 10 units get 10% off "
              "(`shop.pricing.bulk_discount`).\n"),
    )],
    4: [
        _attempt(
            "First try: discount applied to every order (wrong).",
            _edit("shop/pricing.py", "    return quantity * price\n",
                  "    return quantity * price * 0.9\n"),
            _edit("tests/test_pricing.py", "bulk_discount(2, 10), 20)\n", "bulk_discount(2, 10), 20)\n" + BULK_TEST),
        ),
        _attempt(
            "10% off only above 10 units; tests for both sides of the threshold.",
            _edit("shop/pricing.py", "    return quantity * price\n",
                  "    total = quantity * price\n    return total * 0.9 if quantity > 10 else total\n"),
            _edit("tests/test_pricing.py", "bulk_discount(2, 10), 20)\n", "bulk_discount(2, 10), 20)\n" + BULK_TEST),
        ),
    ],
}

ISSUES = [
    (1, "Cart total ignores quantity", "cart_total in shop/cart.py sums unit prices only.", ("backend", "bug")),
    (2, "Checkout button invisible on dark theme", "The .checkout button in web/style.css is #111 on #111.",
     ("frontend",)),
    (3, "Document the discount rules", "Describe the bulk discount in README.md. Depends on #4.",
     ("documentation",)),
    (4, "Bulk discount over 10 items", "Orders over 10 units should get 10% off in shop/pricing.py.",
     ("backend", "high")),
]


class DemoRow(msgspec.Struct):
    task: str
    issue: str
    agent: str
    state: str
    attempt: int
    branch: str
    tests: str


def prepare(data_dir: Path) -> tuple[LocalForge, Path]:
    forge = LocalForge(data_dir / "forge")
    if not forge.exists(REPO):
        forge.create_repo(REPO, FILES)
    scripts = data_dir / "demo-scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    for number, attempts in SCRIPTS.items():
        (scripts / f"demo_shop-{number}.json").write_text(json.dumps({"attempts": attempts}, indent=1))
    return forge, scripts


async def _merge(cluster: LocalCluster, js, ns: Namespace, task_id: str) -> None:
    """What ``ccc pr merge`` does: merge the branch on the forge, publish the fact."""
    task = cluster.coordinator.model.tasks[task_id]
    forge = LocalForge(cluster.forge_root)
    await asyncio.to_thread(forge.merge, task.issue.repo, task.branch,
                            message=f"Merge {task.branch}: {task.issue.title}")
    event = IssuePullRequestMerged(
        event_id=f"demo:{task.issue.repo}#{task.issue.number}:merged:{task.attempt}",
        repo=task.issue.repo, number=task.issue.number, occurred_at=datetime.now(timezone.utc),
        pr_number=task.pr_number, branch=task.branch)
    await js.publish(ns.subject(event.rel_subject), encode(event), headers={"Nats-Msg-Id": event.event_id})


def rows(cluster: LocalCluster) -> list[DemoRow]:
    model = cluster.coordinator.model
    out = []
    for number, title, _, _ in ISSUES:
        t = model.tasks.get(task_id_for(REPO, number))
        if t is None:
            out.append(DemoRow(task_id_for(REPO, number), title, "-", "submitted", 0, "-", "-"))
            continue
        holder = t.agent_id or next((a for a, ts in model.agent_tasks.items() if t.task_id in ts), "-")
        tests = f"{t.tests_passed} passed, {t.tests_failed} failed" if t.branch else (
            t.failure_reason or "-")
        out.append(DemoRow(t.task_id, title, holder, t.status, t.attempt, t.branch or "-", tests))
    return out


async def run_demo(settings: Settings, ns: Namespace, *, timeout: float = 120.0, on_progress=None,
                   api_port: int | None = None, before_stop=None) -> tuple[bool, list[DemoRow], LocalCluster]:
    """Run the demo; returns (every task reached its expected state, rows, cluster)."""
    _, scripts = prepare(settings.data_dir)
    options = ClusterOptions(
        agents=3, specialties=("backend", "frontend", "general"), api_port=api_port,
        script_dir=str(scripts), heartbeat_interval=0.5, heartbeat_timeout=5.0, retry_base=0.5,
        retry_max=2.0, test_timeout=60.0,
    )
    cluster = LocalCluster(settings, ns, options)
    async with cluster:
        js = cluster.nc.jetstream()
        for number, title, body, labels in ISSUES:
            event = IssueOpened(event_id=f"demo:{REPO}#{number}:opened", repo=REPO, number=number,
                                title=title, body=body, labels=labels, author_association=OPERATOR,
                                occurred_at=datetime.now(timezone.utc))
            await js.publish(ns.subject(event.rel_subject), encode(event),
                             headers={"Nats-Msg-Id": event.event_id})
        deadline = time.monotonic() + timeout
        done = False
        merged: set[str] = set()
        while time.monotonic() < deadline:
            current = rows(cluster)
            if on_progress:
                on_progress(current)
            for r in current:  # the reviewer: merge every pull request that is up
                if r.state == "review" and r.task not in merged:
                    merged.add(r.task)
                    await _merge(cluster, js, ns, r.task)
            if all(r.state in ("completed", "failed", "cancelled") for r in current):
                done = all(r.state == "completed" for r in current)
                break
            await asyncio.sleep(0.1)
        await cluster.coordinator.live.catch_up()
        final = rows(cluster)
        if on_progress:
            on_progress(final)
        if before_stop is not None:
            await before_stop(cluster)
    return done, final, cluster
