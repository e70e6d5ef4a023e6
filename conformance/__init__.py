"""Conformance vectors and the runner that checks a decoder implementation against them."""
