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


@pytest.fixture(scope="session")
def plugin_exports(tmp_path_factory):
    """Every plugin architecture trained and exported once for the session
    (`support.train_export`): {architecture: (export folder, trained SAE in eval mode)}."""
    from sae_lens_allocation import ARCHITECTURES

    root = tmp_path_factory.mktemp("plugin-exports")
    return {arch: support.train_export(arch, root / arch) for arch in ARCHITECTURES}
