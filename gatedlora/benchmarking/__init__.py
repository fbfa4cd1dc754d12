"""Base path against adapter path: timing, model-level scenarios, reports (used by `gatedlora bench`
and by the pytest-benchmark suites in benchmarks/)."""
