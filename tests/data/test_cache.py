from monai.transforms import Resized, ScaleIntensityRanged

from medfm.data import transform_state_hash
from medfm.transforms import LoadPETCTd, PromptTokenizer, TokenizePromptd


def _pipeline(size=(64, 64, 96), a_min=-1000, context_length=32):
    return [
        LoadPETCTd(keys=("ct", "pet"), label_key=None),
        Resized(keys=["ct", "pet"], spatial_size=size),
        ScaleIntensityRanged("ct", a_min, 1000, 0.0, 1.0, clip=True),
        TokenizePromptd("prompt", PromptTokenizer(context_length=context_length)),
    ]


def test_hash_is_stable_for_equal_settings():
    assert transform_state_hash(_pipeline()) == transform_state_hash(_pipeline())


def test_hash_changes_with_any_cached_setting():
    """A changed resize, intensity window or tokenizer must not reuse cache files of the old settings."""
    base = transform_state_hash(_pipeline())
    assert transform_state_hash(_pipeline(size=(64, 64, 128))) != base
    assert transform_state_hash(_pipeline(a_min=-1024)) != base
    assert transform_state_hash(_pipeline(context_length=16)) != base
