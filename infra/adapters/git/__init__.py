"""Git and the file system: git operations (GitPython), the agent's mirror of each
repository and the task checkouts made from it (warm repositories), the per-task
workspace with its confined command runner and retention cleanup, test-runner output
parsing, the workbench that puts them together for an agent's pipeline (and its one
background thread), and the helpers that keep child processes from outliving us."""
