"""The Python client of the secateurs API (httpx + Pydantic; imports none of the service's own packages, nor
torch, transformers or SQLAlchemy).

    from client import Client

    with Client("http://localhost:8000", api_key="sct_...") as c:
        job = c.create_job(model="/models/llama", method="wanda", sparsity=0.5,
                           calibration={"source": "c4", "nsamples": 128})
        job = c.wait(job.id, on_progress=lambda p: print(p.stage, p.block, p.fraction))
        c.download(job.id, "./pruned")   # AutoModelForCausalLM.from_pretrained("./pruned")
"""

from client.client import Client, DownloadedFile, DownloadResult, RetryPolicy
from client.errors import (
    ApiError,
    AuthenticationError,
    BadRequest,
    ChecksumMismatch,
    Conflict,
    ConnectionFailed,
    DownloadError,
    NotFound,
    RateLimited,
    SecateursError,
    ServiceUnavailable,
    StreamUnavailable,
    TooLarge,
    WaitTimeout,
)
from client.models import (
    TERMINAL,
    Artifact,
    CalibrationSet,
    CalibrationSetList,
    CreatedJob,
    Event,
    EventList,
    Job,
    JobError,
    JobList,
    Problem,
    Progress,
    Timestamps,
)

__all__ = [
    "TERMINAL",
    "ApiError",
    "Artifact",
    "AuthenticationError",
    "BadRequest",
    "CalibrationSet",
    "CalibrationSetList",
    "ChecksumMismatch",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "CreatedJob",
    "DownloadError",
    "DownloadResult",
    "DownloadedFile",
    "Event",
    "EventList",
    "Job",
    "JobError",
    "JobList",
    "NotFound",
    "Problem",
    "Progress",
    "RateLimited",
    "RetryPolicy",
    "SecateursError",
    "ServiceUnavailable",
    "StreamUnavailable",
    "Timestamps",
    "TooLarge",
    "WaitTimeout",
]
