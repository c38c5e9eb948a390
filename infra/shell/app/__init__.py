"""The application: the one composition root that builds adapters and hands them to the
actors (``cluster``), the offline demo, and signal handling for long-running commands."""
