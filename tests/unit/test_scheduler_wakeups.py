"""The events that do not wake the coordinator's scheduler can never free work or slots."""

from __future__ import annotations


def test_the_scheduler_sleeps_through_no_event_that_can_free_work_or_slots():
    """The events the scheduler is not woken by must not be able to queue a task, free a
    slot (a task leaving assigned/in progress/testing), complete a dependency or make an
    agent accept work: derived from the transition tables, so a new event or transition
    cannot silently strand queued tasks."""
    from actors.coordinator import NOTHING_TO_SCHEDULE
    from events import agent_state, task_state
    from events.agent import AgentTaskStarted, WorkReport

    for event_type, (sources, target) in task_state.TRANSITIONS.items():
        if target is None:
            continue  # no status change
        frees_or_queues = any((s in task_state.WITH_AGENT) != (target in task_state.WITH_AGENT)
                              or (s == "queued") != (target == "queued") for s in sources) \
            or target == "completed"
        if frees_or_queues:
            assert not issubclass(event_type, NOTHING_TO_SCHEDULE), event_type.__name__
    # a creation can queue a task (a synchronous analyser's decision recorded on it)
    assert not issubclass(task_state.TaskCreated, NOTHING_TO_SCHEDULE)
    for event_type in agent_state.TRANSITIONS:
        if issubclass(event_type, NOTHING_TO_SCHEDULE):
            # only starting work and progress reports: they never make an agent accept more
            assert issubclass(event_type, (AgentTaskStarted, WorkReport)), event_type.__name__
