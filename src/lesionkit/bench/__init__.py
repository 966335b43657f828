"""Benchmarks: how fast this machine loads, trains, evaluates and serves, each saving measured against its
baseline in the same process (``lesionkit benchmark``)."""
