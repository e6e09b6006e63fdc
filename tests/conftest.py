"""pytest configuration: the report header says which lowbit (and which backends) is under test."""

from __future__ import annotations

import os
import warnings

import pytest
from hypothesis import settings

import lowbit

# `pytest --hypothesis-profile=long`: 20 times the examples of the property suites (tests/
# test_bad_input_properties.py scales its counts with max_examples), random instead of derandomized.
settings.register_profile("long", max_examples=2000, deadline=None)


def pytest_report_header(config):
    lines = [f"lowbit {lowbit.__version__} from {os.path.dirname(lowbit.__file__)}"]
    for status in lowbit.backends.available():
        lines.append(f"  backend {status.name}: {'available' if status.available else status.reason}")
    return lines


# ---- Hugging Face integration tests (transformers is imported only when a fixture is used) ----
@pytest.fixture
def hf_quiet():
    """transformers without log lines, progress bars or warnings, so test output stays readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def smollm2() -> str:
    """SmolLM2-135M-Instruct as a float32 checkpoint folder (docs/design.md §7)."""
    from lowbit.integrations import assets

    return assets.smollm2_dir(log=None)


@pytest.fixture(scope="module")
def hamlet(smollm2):
    """The first 20,000 token ids of Hamlet."""
    from transformers import AutoTokenizer

    from lowbit.integrations import assets

    return assets.hamlet_ids(AutoTokenizer.from_pretrained(smollm2))
