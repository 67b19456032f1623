"""LitServe serving the same exported policy with the same brief code (the anchor server).

Run by ``bench_serving_throughput.py``: ``python litserve_policy_server.py <export_dir> <port>``.
The model is loaded with the same safe loader (``ExportStore.load``); the request does the same
work as ``/dna/create``: rule-based brief, then ``formulate`` with the policy.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at runtime
# to build the FastAPI endpoint, and a string annotation would turn the body into a query field.
import sys
from typing import Any

import litserve as ls
import torch

from lightning_fragrance.fragrance import formulate
from lightning_fragrance.monitoring import BriefMode
from lightning_fragrance.serving.brief import RuleBasedBriefGenerator
from lightning_fragrance.serving.loading import ExportStore


class PolicyAPI(ls.LitAPI):
    """``setup`` loads the export; ``predict`` is brief → policy → formula."""

    def __init__(self, export_dir: str) -> None:
        super().__init__()
        self.export_dir = export_dir

    def setup(self, device: str) -> None:
        # Same intra-op threads as lf-serve's default (`torch_threads: 1`), so both run the
        # same request code under the same torch settings.
        torch.set_num_threads(1)
        store = ExportStore(self.export_dir)
        version = store.current() or store.newest()
        assert version is not None
        self.loaded = store.load(version)
        self.brief = RuleBasedBriefGenerator()

    def decode_request(self, request: dict[str, Any]) -> tuple[str, BriefMode]:
        return request["user_text"], BriefMode(request.get("mode", "balanced"))

    def predict(self, x: tuple[str, BriefMode]) -> dict[str, Any]:
        result = self.brief.generate(x[0], x[1])
        dna = formulate(self.loaded.model, result.brief)  # type: ignore[arg-type]
        return {
            "version": self.loaded.version,
            "brief": result.brief.model_dump(mode="json"),
            "brief_source": result.source.value,
            "dna": dna.model_dump(mode="json"),
        }

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


if __name__ == "__main__":
    export_dir, port = sys.argv[1], int(sys.argv[2])
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    server = ls.LitServer(PolicyAPI(export_dir), accelerator="cpu", workers_per_device=workers)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")
