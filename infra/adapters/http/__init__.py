"""HTTP: one ASGI service under uvicorn, the status-API server on it, ``/metrics``
(prometheus-client's ASGI app, with the API's request metrics), and the GitHub webhook
receiver with its pure payload translation."""
