"""Benchmarks and the tools they run against (e.g. the vLLM-compatible simulator in epp_bench.sim)."""
