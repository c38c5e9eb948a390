"""Example plugins for claude-code-cluster: each module is one plugin, its entry point
in ``pyproject.toml`` (group ``ccc.hooks``)."""
