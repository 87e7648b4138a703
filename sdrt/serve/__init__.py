"""`sdrt serve`: HTTP APIs over one engine folder (the `[serve]` extra: FastAPI, uvicorn, prometheus-client)."""
