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


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """``demo_data(bundle)``: the folder of that bundle's synthetic demo data (FratMAE: 4 cases), generated once per
    session and shared by every test that only reads it (runs write their caches under their output folders)."""
    from medfm.data import ensure_demo_midol, ensure_demo_panfm, ensure_demo_petct, ensure_demo_spad

    makers = {"fratmae_petct": lambda d: ensure_demo_petct(d, num_cases=4, seed=0),
              "spad_vit": lambda d: ensure_demo_spad(d, seed=0),
              "panfm_panorgan": lambda d: ensure_demo_panfm(d, seed=0),
              "midol_multimodal": lambda d: ensure_demo_midol(d, seed=0)}  # fmt: skip
    root = tmp_path_factory.mktemp("demo_data")
    made: dict[str, str] = {}

    def get(bundle: str) -> str:
        if bundle not in made:
            made[bundle] = makers[bundle](str(root / bundle))
        return made[bundle]

    return get


def bundle_config(bundle: str, *names: str) -> list[str]:
    """Absolute paths of a bundle's config files."""
    return [os.path.join(BUNDLES, bundle, "configs", n) for n in names]


def pytest_collection_finish(session):
    """Freeze what collection made (the test modules, the libraries they import, the test items): about half a
    million objects that live for the whole session and that every full garbage collection would otherwise
    traverse again (``gc.collect()`` after each in-process bundle run, and Python's own full collections)."""
    import gc

    gc.collect()
    gc.freeze()
