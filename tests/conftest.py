import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest

import support  # sets the offline environment before HF libraries load


@pytest.fixture(scope="session")
def tiny_model():
    return support.tiny_model()


@pytest.fixture(scope="session")
def tiny_dataset():
    return support.tiny_dataset()
