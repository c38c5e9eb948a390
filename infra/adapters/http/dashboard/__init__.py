"""The web dashboard, served by the status API on its port (``ccc api``, ``ccc up``):
server-rendered HTML (Jinja2, autoescaped) with small progressive enhancement in plain
JavaScript; no build step, no framework, no CDN: the templates and static files ship in
the package, so it works offline.

* :mod:`~infra.adapters.http.dashboard.pages`: the pages (overview, board, task, agent,
  artifacts) and their live fragments, over the pure view models of
  :mod:`projections.dashboard`;
* :mod:`~infra.adapters.http.dashboard.live`: ``/ui/stream``, server-sent events pushed
  from the live projection;
* :mod:`~infra.adapters.http.dashboard.actions` and
  :mod:`~infra.adapters.http.dashboard.csrf`: the actions (write scope, CSRF-safe) and
  signing in with a token.

:class:`infra.adapters.http.status_server.ApiServer` mounts all of it.
"""
