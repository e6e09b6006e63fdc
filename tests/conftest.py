"""pytest configuration: the report header says which lowbit (and which backends) is under test."""

from __future__ import annotations

import os

import lowbit


def pytest_report_header(config):
    lines = [f"lowbit {lowbit.__version__} from {os.path.dirname(lowbit.__file__)}"]
    for status in lowbit.backends.available():
        lines.append(f"  backend {status.name}: {'available' if status.available else status.reason}")
    return lines
