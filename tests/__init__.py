"""The test suite is a package: test modules import shared code as ``tests.helpers`` / ``tests.fixtures.…``."""
