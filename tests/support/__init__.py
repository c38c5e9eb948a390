"""Helpers shared by tests: domain given/when/then, random histories, e2e process helpers,
the golden-log generator."""
