"""discoverd's own test tooling, kept out of the installed package: launchers for the real
services (:mod:`tests.support.services`: Docker Engine, etcd, test images and backends;
:mod:`tests.support.consul`: a Consul agent), used by the tests, ``scripts/demo.py`` and the
benchmarks in ``bench/`` (run both from the repository root: ``python -m bench.churn``).
"""
