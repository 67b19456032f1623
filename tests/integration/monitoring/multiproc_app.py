"""A tiny FastAPI app that records through OperationsMetricsCollector (for the uvicorn test).

Run with ``PROMETHEUS_MULTIPROC_DIR`` set and ``uvicorn --workers N``: every worker imports this
module and records into its own files; ``/metrics`` merges them, whichever worker answers.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry

from lightning_fragrance.monitoring import OperationsMetricsCollector

collector = OperationsMetricsCollector(CollectorRegistry())
collector.set_model_version("000001-step10", "current")
app = FastAPI()


@app.post("/brief/{mode}")
def brief(mode: str) -> dict[str, int]:
    with collector.track_api_request("/brief/{mode}", "POST") as request:
        collector.record_llm_brief(mode, True, 0.01)
        request.set_status_code(200)
    return {"pid": os.getpid()}


@app.get("/metrics")
def metrics() -> Response:
    return Response(collector.exposition(), media_type=collector.content_type)
