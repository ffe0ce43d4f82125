"""OpenAI's Batch API on the worker's server: `/v1/files` and `/v1/batches`, their batches run at
the flex tier through the batch-line answering of operations/batch.py, kept in a folder
(BATCH_DIR) that a restart or another server sharing it takes up (docs/batch-api.md)."""

from .api import BatchAnswer, BatchAPI, Download, Incoming
from .settings import BATCH_VARIABLES, BatchSettings

__all__ = ["BATCH_VARIABLES", "BatchAnswer", "BatchAPI", "BatchSettings", "Download", "Incoming"]
