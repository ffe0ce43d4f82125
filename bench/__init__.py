"""The worker's benchmarks, run from the repository root as modules: `python -m bench.run`."""
