"""`python -m embedding_worker`: the same as the embedding-worker command."""

from .cli import main

main()
