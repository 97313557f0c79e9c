"""The FastAPI app under /v1: feedback ingest, comparison tasks, registry reads,
cycles, deployments and the operator dashboard."""
