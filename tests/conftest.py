import os

# One compute thread per process unless the caller sets OMP_NUM_THREADS: the suite runs on small shared machines
# and starts two-process runs (torchrun, spawned ranks) beside this one; the subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = os.path.join(REPO, "bundles")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bundle_config(bundle: str, *names: str) -> list[str]:
    """Absolute paths of a bundle's config files."""
    return [os.path.join(BUNDLES, bundle, "configs", n) for n in names]
