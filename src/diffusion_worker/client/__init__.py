"""The calling side of the worker: submit a job, poll it, cancel it on a timeout, fall back from a dedicated pod
to a serverless endpoint, and download its results with their digests checked.

Imports the job schema and `requests`, never torch: it runs wherever jobs are sent from.

    from diffusion_worker.client import Client

    client = Client(["http://127.0.0.1:8000", "my-endpoint-id"])  # a pod first, then RunPod serverless
    result = client.run({"prompt": "a lighthouse", "seed": 7}, output_dir=Path("outputs"), timeout_s=600)
    result.files  # [outputs/<job id>/0.png, outputs/<job id>/0.thumb.webp, ..., outputs/<job id>/response.json]
"""

from ..errors import InvalidInput
from .failures import ClientError, DownloadFailed, JobFailed, JobTimedOut, NoEndpointReachable
from .jobs import Client, JobResult
from .transport import Backoff, Endpoint

__all__ = [
    "Backoff",
    "Client",
    "ClientError",
    "DownloadFailed",
    "Endpoint",
    "InvalidInput",
    "JobFailed",
    "JobResult",
    "JobTimedOut",
    "NoEndpointReachable",
]
