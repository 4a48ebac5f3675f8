"""Helpers and fixtures for testing discoverd and its plugins against real services.

:mod:`discoverd.testing.services` starts private Docker Engine daemons and etcd members on
loopback, builds the local test images and runs small HTTP backends in containers.
"""
