"""Contract suites: one suite per port, every implementation passes it (as eventsourcing does
for its recorders)."""
