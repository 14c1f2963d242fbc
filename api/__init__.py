"""HTTP API (FastAPI). Routers are thin: they parse, call a service, commit, and render."""
