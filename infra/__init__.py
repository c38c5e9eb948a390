"""Everything with I/O besides the event store, in two layers.

- :mod:`infra.adapters` sits BELOW the actors: NATS, git, forges, coders, HTTP and
  observability. Actors never import it; they declare Protocols (``actors.ports``) that
  these adapters satisfy. Adapters never import actors or the shell.
- :mod:`infra.shell` sits ABOVE them: the ``ccc`` command line, the application
  (cluster wiring = the one composition root, the demo), the chaos suite and the
  benches. It imports everything; only the ``ccc`` entry point imports it.

The layering is checked by import-linter contracts in ``pyproject.toml``.
"""
