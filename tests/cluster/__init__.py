"""Cluster tests: real ``corral serve`` processes on one Postgres database (``harness``), and a
checker that reads the whole history back and lists what breaks the invariants (``checker``)."""
