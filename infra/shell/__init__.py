"""The application shell, above the actors: the ``ccc`` CLI, the app (cluster wiring,
the demo), the chaos suite and the benches. Imports everything; imported only by the
``ccc`` entry point (``infra.shell.cli.main:main``)."""
