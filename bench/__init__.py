"""Benchmark harness for issue 5: ``python -m bench.run`` (see BENCHMARKS.md)."""
