"""RunPod's entry point: `python handler.py` runs the serverless worker (embedding_worker.cli).

On RunPod it takes jobs; elsewhere runpod's local test answers ./test_input.json and prints the
answer. `--serve` and `--batch FILE --output FILE` run the local modes; `--help` lists every flag.
"""

from embedding_worker.cli import handler_main

if __name__ == "__main__":
    handler_main()
