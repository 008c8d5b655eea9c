import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = os.path.join(REPO, "bundles")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bundle_config(bundle: str, *names: str) -> list[str]:
    """Absolute paths of a bundle's config files."""
    return [os.path.join(BUNDLES, bundle, "configs", n) for n in names]
