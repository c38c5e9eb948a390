"""``ccc demo``: the whole issue -> pull request flow on a sample repository, with
no API key and no network. A real nats-server, the real coordinator and agents, real
git; the coding is replayed by the scripted coder from recorded sessions.

The sample: a small shop library with stdlib tests, a style check that runs in CI
only (as many projects' lint jobs do), and five issues
  #1 backend   "Cart total ignores quantity"               -> the agent's tests pass, but CI's
                                                              style check fails on the first
                                                              push: a CI fix round makes it green
  #2 frontend  "Checkout button invisible on dark theme"   -> CSS change
  #3 docs      "Document the discount rules"               -> depends on #4: waits for it
  #4 backend   "Bulk discount over 10 items"               -> tests fail first, retried, passes
  #5 backend   "Cart total: apply a coupon"                -> names shop/cart.py like #1: waits
                                                              for #1's file lease, then runs on
                                                              the merged main (no conflict)
The local forge runs each pushed commit's ``.ccc/test-command`` (the CI), and
``demo/shop`` merges through the merge queue. The demo plays the reviewer: every pull
request whose checks are green is approved (as ``ccc pr approve`` does); the queue then
merges them one at a time, each tested on the latest main first. The summary measures
how well the analysis predicted the files each change touched (the leases' basis).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from events.codec import encode
from events.issue import IssueOpened, IssuePullRequestApproved
from events.trust import OPERATOR
from events.subjects import Namespace, task_id_for

from projections.leases import PredictionScore, lease_blocker, prediction_score

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
    "tests/test_style.py": (
        "import os\nimport pathlib\nimport unittest\n\nROOT = pathlib.Path(__file__).resolve().parent.parent\n\n\n"
        '@unittest.skipUnless(os.environ.get("CI"), "the style check runs in CI")\n'
        "class StyleTest(unittest.TestCase):\n"
        "    def test_lines_fit_79_columns(self):\n"
        "        long = [f\"{p.relative_to(ROOT)}:{n}: line too long ({len(line)} > 79)\"\n"
        "                for p in sorted((ROOT / 'shop').glob('*.py'))\n"
        "                for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 79]\n"
        "        self.assertEqual(long, [], '\\n'.join(long))\n"
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


# the line #1's first push leaves too long for the CI's style check, and its fix
LONG_LINE = "    return sum(price * quantity for price, quantity in items)  # unit price times quantity\n"
FIXED_LINES = "    # unit price times quantity, per line\n    return sum(price * quantity for price, quantity in items)\n"

SCRIPTS: dict[int, dict[str, list[dict]]] = {
    1: {"attempts": [_attempt(
        "cart_total now multiplies unit price by quantity; test added.",
        _edit("shop/cart.py", "    return sum(price for price, quantity in items)\n", LONG_LINE),
        _edit("tests/test_cart.py", "self.assertEqual(cart_total([(5, 1)]), 5)\n",
              "self.assertEqual(cart_total([(5, 1)]), 5)\n\n"
              "    def test_quantity(self):\n        self.assertEqual(cart_total([(5, 3), (2, 2)]), 19)\n"),
    )], "ci_fixes": [_attempt(
        "CI's style check: the return line was 91 columns; the comment moved above it.",
        _edit("shop/cart.py", LONG_LINE, FIXED_LINES),
    )]},
    5: {"attempts": [_attempt(
        "cart_total takes an optional coupon (a fraction off the total); test added.",
        _edit("shop/cart.py", 'def cart_total(items):\n    """items: list of (unit_price, quantity)."""\n',
              'def cart_total(items, coupon=0.0):\n'
              '    """items: list of (unit_price, quantity); coupon: fraction off."""\n'),
        _edit("shop/cart.py", "    return sum(price * quantity for price, quantity in items)\n",
              "    total = sum(price * quantity for price, quantity in items)\n"
              "    return total * (1 - coupon)\n"),
        _edit("tests/test_cart.py", "    def test_empty(self):\n",
              "    def test_coupon(self):\n        self.assertEqual(cart_total([(10, 2)], coupon=0.5), 10)\n\n"
              "    def test_empty(self):\n"),
    )]},
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
    (5, "Cart total: apply a coupon", "cart_total in shop/cart.py should take a coupon (a fraction off).",
     ("backend",)),
]


class DemoRow(msgspec.Struct):
    task: str
    issue: str
    agent: str
    state: str
    attempt: int
    branch: str
    tests: str
    ci: str = "-"  # the pull request's way to green: CI fix rounds, re-runs, the queue


class DemoSummary(msgspec.Struct):
    """What the demo shows beyond the rows: the CI loop, the lease and the prediction."""

    ci_fixed: list[str]  # tasks whose CI failed and a fix round made green
    lease_waits: dict[str, str]  # task -> the lease it waited for (first seen)
    merged_in_order: list[str]  # the merge queue's merges, in order
    prediction: PredictionScore


def prepare(data_dir: Path) -> tuple[LocalForge, Path]:
    forge = LocalForge(data_dir / "forge")
    if not forge.exists(REPO):
        forge.create_repo(REPO, FILES)
    scripts = data_dir / "demo-scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    for number, script in SCRIPTS.items():
        body = script if isinstance(script, dict) else {"attempts": script}
        (scripts / f"demo_shop-{number}.json").write_text(json.dumps(body, indent=1))
    return forge, scripts


async def _approve(cluster: LocalCluster, js, ns: Namespace, task_id: str) -> None:
    """What ``ccc pr approve`` does: a reviewer's approval, as a fact."""
    task = cluster.coordinator.model.tasks[task_id]
    event = IssuePullRequestApproved(
        event_id=f"demo:{task.issue.repo}#{task.issue.number}:approved:{task.head_sha}",
        repo=task.issue.repo, number=task.issue.number, occurred_at=datetime.now(timezone.utc),
        pr_number=task.pr_number, branch=task.branch, author="demo-reviewer", author_association=OPERATOR)
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
        ci = "-"
        if t.head_sha:
            ci = ", ".join(part for part in (
                f"{t.ci_fixes} CI fix" + ("es" if t.ci_fixes != 1 else "") if t.ci_fixes else "",
                f"{t.reruns} re-run(s)" if t.reruns else "",
                "merged by the queue" if t.merge_sha else "",
            ) if part) or "green first time"
        out.append(DemoRow(t.task_id, title, holder, t.status, t.attempt, t.branch or "-", tests, ci))
    return out


async def run_demo(settings: Settings, ns: Namespace, *, timeout: float = 120.0, on_progress=None,
                   api_port: int | None = None, before_stop=None,
                   summary: list | None = None) -> tuple[bool, list[DemoRow], LocalCluster]:
    """Run the demo; returns (every task reached its expected state, rows, cluster).
    ``summary``, if given, receives the :class:`DemoSummary`."""
    _, scripts = prepare(settings.data_dir)
    options = ClusterOptions(
        agents=3, specialties=("backend", "frontend", "general"), api_port=api_port,
        script_dir=str(scripts), heartbeat_interval=0.5, heartbeat_timeout=5.0, retry_base=0.5,
        retry_max=2.0, test_timeout=60.0, merge_queue=(REPO,), max_ci_fixes=2,
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
        approved: set[tuple[str, str]] = set()
        waits: dict[str, str] = {}
        model = cluster.coordinator.model
        while time.monotonic() < deadline:
            current = rows(cluster)
            if on_progress:
                on_progress(current)
            for r in current:  # the reviewer: approve every pull request whose checks are green
                t = model.tasks.get(r.task)
                if t is not None and r.state == "review" and (r.task, t.head_sha) not in approved:
                    approved.add((r.task, t.head_sha))
                    await _approve(cluster, js, ns, r.task)
                if t is not None and t.status == "queued" and r.task not in waits:
                    if (lease := lease_blocker(t, model.tasks)) is not None:
                        waits[r.task] = lease.reason
            if all(r.state in ("completed", "failed", "cancelled") for r in current):
                done = all(r.state == "completed" for r in current)
                break
            await asyncio.sleep(0.1)
        await cluster.coordinator.live.catch_up()
        final = rows(cluster)
        if summary is not None:
            summary.append(_summary(cluster, waits))
        if on_progress:
            on_progress(final)
        if before_stop is not None:
            await before_stop(cluster)
    return done, final, cluster


def _summary(cluster: LocalCluster, waits: dict[str, str]) -> DemoSummary:
    model = cluster.coordinator.model
    ours = [model.tasks[t] for t in (task_id_for(REPO, n) for n, *_ in ISSUES) if t in model.tasks]
    merged = sorted((t for t in ours if t.merge_sha), key=lambda t: t.updated_at)
    return DemoSummary(
        ci_fixed=[t.task_id for t in ours if t.ci_fixes and t.green_at is not None],
        lease_waits=waits, merged_in_order=[t.task_id for t in merged],
        prediction=prediction_score(ours))
