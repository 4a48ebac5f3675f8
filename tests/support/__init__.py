"""discoverd's own test tooling, kept out of the installed package, used by the tests,
``scripts/demo.py`` and the benchmarks in ``bench/`` (run both from the repository root:
``python -m bench.churn``):

- :mod:`tests.support.services`: Docker Engine (private daemons on their own bridges), a
  single-member etcd, the test images and whoami backends;
- :mod:`tests.support.etcd`: an etcd cluster (failover) and TLS members, reading the registry;
- :mod:`tests.support.consul`: a Consul ``-dev`` agent and a cluster of servers;
- :mod:`tests.support.discoverd`: discoverd as a subprocess, and ending the proxies it leaves;
- :mod:`tests.support.probe`: client loops counting failed requests through a frontend;
- :mod:`tests.support.haproxy`: what a running HAProxy routes to, through its sockets.
"""
