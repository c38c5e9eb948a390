"""A bench's helper process (``infra.shell.bench.child``): a child that cannot start is
a clear error quoting its log, not a hang."""

from __future__ import annotations

import pytest

from infra.shell.bench.child import Child

pytestmark = pytest.mark.timeout(60)


async def test_a_child_that_cannot_start_is_reported_with_its_log(tmp_path) -> None:
    child = Child("infra.shell.bench.no_such_module", ["serve"], tmp_path / "child.log", what="missing")
    with pytest.raises(RuntimeError, match=r"the missing process did not start: .*No module named"):
        await child.start()
    assert child.pid is None  # nothing left running
    assert await child.stop() == {}


async def test_asking_a_child_that_is_not_running_says_so(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="is not running"):
        await Child("infra.shell.bench.fleet", ["coordinator"], tmp_path / "c.log").ask("stats")
