"""The benchmarks' tests (bench/): their pure parts and smoke runs; no timing assertions."""
