"""Plugins through Python entry points: discovered (:mod:`.discovery`), enabled by
configuration only, each run behind a guard in a thread of its own (:mod:`.guard`),
counted (:mod:`.metrics`) and reported on the bus (:mod:`.health`); :mod:`.host` holds a
process's hook plugins. What the hooks mean to the cluster (the answers, the fail-open or
-closed rule of each policy point) is declared by their consumers, :mod:`actors.plugins`.
"""
