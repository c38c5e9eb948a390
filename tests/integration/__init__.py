"""Against real things: a nats-server per session, git repositories, local HTTP servers."""
