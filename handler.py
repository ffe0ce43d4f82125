"""RunPod serverless worker for text embeddings and reranking (Infinity engine).

Models load at import, so the cold start is paid once, before the first job.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from embedding_worker.app import build_worker, main  # noqa: E402

worker = build_worker()

if __name__ == "__main__":
    main(worker, sys.argv[1:])
