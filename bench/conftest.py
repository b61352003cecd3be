"""Options of the pytest-benchmark cases (``pytest bench/ --benchmark-only``)."""

from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("metakernels bench")
    group.addoption("--mk-quick", action="store_true",
                    help="the --quick sizes of `metakernels bench` (a smoke run)")
    group.addoption("--mk-device", default="cpu", help="where to run (default cpu)")
    group.addoption("--mk-rounds", type=int, default=5, help="timed rounds per case (default 5)")
