"""Events: the msgspec event types, the subject scheme, the pure state machines and
the event store. Everything else in the project is built from these."""

from .agent import (
    AgentErrored,
    AgentEvent,
    AgentMaintenanceEnded,
    AgentMaintenanceStarted,
    AgentRecovered,
    AgentRegistered,
    AgentTaskReleased,
    AgentTaskStarted,
    AgentWentOffline,
    Heartbeat,
)
from .codec import Event, decode_event, decode_issue, encode
from .errors import (
    BadEventError,
    CccError,
    ConcurrencyConflict,
    ConfigError,
    DomainError,
    IllegalTransition,
    InfrastructureError,
    StoreUnavailable,
    VersionMismatch,
)
from .issue import (
    IssueCancelRequested,
    IssueClosed,
    IssueEdited,
    IssueEvent,
    IssueLabeled,
    IssueOpened,
    IssuePullRequestClosed,
    IssuePullRequestMerged,
    IssueReopened,
    IssueRetryRequested,
)
from .subjects import DEFAULT_NS, Namespace, task_id_for
from .task import (
    IssueRef,
    TaskAnalysisStarted,
    TaskAnalyzed,
    TaskAssigned,
    TaskCancellationRequested,
    TaskCancelled,
    TaskCompleted,
    TaskCreated,
    TaskEvent,
    TaskFailed,
    TaskPullRequestOpened,
    TaskRequeued,
    TaskStarted,
    TaskTestsStarted,
    Usage,
)

__all__ = [name for name in dir() if not name.startswith("_")]
