"""Forges: the local forge (bare repositories on disk, the embedded default) and GitHub
(PyGithub: clone URLs, git credentials, pull requests, issue labels and comments), with
one family of errors for both (:mod:`infra.adapters.forge.errors`)."""
