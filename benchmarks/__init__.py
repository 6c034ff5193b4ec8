"""hopwatch's benchmarks: how much one monitor carries, and whether the latency it reports is the
system's or its own, measured side by side with Prometheus blackbox_exporter on loopback.

Run them with `python -m benchmarks` (or `make bench`); see benchmarks/README.md.
"""
