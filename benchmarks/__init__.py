"""Speed benchmarks (not tests): `make bench` = `python -m benchmarks`; see docs/performance.md."""
