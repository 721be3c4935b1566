"""Corral's benchmarks: each scenario drives a real `corral serve` over HTTP/SSE."""
