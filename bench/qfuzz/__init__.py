"""A structure-aware fuzzer for qformat readers: seed corpus, mutations, a fork server with memory caps and timeouts.

Run it with ``python bench/fuzz.py`` (see that file); ``tests/fuzz/test_fuzz_short.py`` runs a fixed-seed batch in CI.
Every case is reproducible from (seed, target, case id): ``python bench/fuzz.py --replay CASE``.
"""
