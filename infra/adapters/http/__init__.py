"""HTTP: one ASGI service under uvicorn, the status-API server on it, and the GitHub
webhook receiver with its pure payload translation."""
