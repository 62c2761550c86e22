"""Reliability and security suite (issue 6): load, faults, Redis outages, bad input, isolation, shutdown, soak.

Every test runs against a real gateway on loopback (in a thread via ``tests.harness.run_gateway``, or as its
own ``python -m gateway serve`` process where memory, logs or signals are observed) and real scripted
upstream processes. Redis faults use a private ``redis-server`` per test on a free port, never the
machine's shared instance at 127.0.0.1:6379.
"""
