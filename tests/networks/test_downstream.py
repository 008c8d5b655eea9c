import pytest
import torch

from medfm.networks import load_fratmae_encoders
from medfm.networks.blocks import evenly_spaced_layers
from medfm.networks.nets import FratMAE, FratMAEClassifier, FratMAESegmenter

ENC = dict(hidden_size=32, num_layers=4, num_heads=4, mlp_dim=64)


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(12, 4) == [2, 5, 8, 11]  # UNETR's z3, z6, z9, z12
    assert evenly_spaced_layers(4, 2) == [1, 3]


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_segmenter_shapes_and_gradients(patch):
    net = FratMAESegmenter(out_channels=3, patch_size=patch, feature_size=4, **ENC)
    x = torch.rand(1, 2, 16, 32, 16)
    out = net(x)
    assert out.shape == (1, 3, 16, 32, 16)
    out.mean().backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "cls_token" not in n)


def test_segmenter_concatenates_pet_and_ct_features():
    """Channel 1 (CT) reaches the output, and patch 8 gives UNETR's layout one level shallower."""
    net = FratMAESegmenter(patch_size=8, feature_size=4, **ENC).eval()
    x = torch.rand(1, 2, 16, 16, 16)
    y = net(x)
    x2 = x.clone()
    x2[:, 1] += 0.5
    assert not torch.allclose(net(x2), y)
    assert len(net.skips) == 2 and len(net.decoders) == 3  # patch 8: skips at 1/2, 1/4, bottleneck at 1/8


def test_segmenter_bottleneck_follows_the_last_feature_layer():
    """feature_layers [0, 1, 2] of 4 blocks: the bottleneck is block 2's output, so block 3 and the final norm
    play no part (before, the last entry was checked but the final block's normed output was always used)."""
    torch.manual_seed(0)
    net = FratMAESegmenter(patch_size=8, feature_size=4, feature_layers=[0, 1, 2], **ENC).eval()
    x = torch.rand(1, 2, 16, 16, 16)
    y = net(x)
    with torch.no_grad():
        for enc in net.encoders.values():
            for p in [*enc.blocks[3].parameters(), *enc.norm.parameters()]:
                p.add_(torch.randn_like(p))
    torch.testing.assert_close(net(x), y)
    default = FratMAESegmenter(patch_size=8, feature_size=4, **ENC).eval()  # [0, 2, 3]: final normed output
    default.load_state_dict(net.state_dict())
    before = default(x)
    with torch.no_grad():
        for p in default.encoders["pet"].norm.parameters():
            p.add_(1.0)
    assert not torch.allclose(default(x), before)


def test_classifier_logits():
    net = FratMAEClassifier(num_classes=2, patch_size=8, mlp_hidden=16, **ENC)
    assert net(torch.rand(3, 2, 16, 8, 16)).shape == (3, 2)


def test_segmenter_feature_layers_follow_the_trunk_index_convention():
    """Negative indices count from the end and an int n means the last n blocks, as every backbone's
    ``forward_intermediates``; both give the same network as the positive indices they stand for."""
    torch.manual_seed(0)
    ref = FratMAESegmenter(patch_size=8, feature_size=4, feature_layers=[1, 2, 3], **ENC).eval()
    x = torch.rand(1, 2, 16, 16, 16)
    for layers in ([-3, -2, -1], 3):
        net = FratMAESegmenter(patch_size=8, feature_size=4, feature_layers=layers, **ENC).eval()
        assert net.feature_layers == [1, 2, 3]
        net.load_state_dict(ref.state_dict())
        torch.testing.assert_close(net(x), ref(x))
    with pytest.raises(ValueError, match="feature_layers"):
        FratMAESegmenter(patch_size=8, feature_layers=[0, 1, 4], **ENC)  # 4 blocks: index 4 is out of range


@pytest.mark.parametrize("bad", [{"patch_size": 12}, {"patch_size": 2}, {"patch_size": 8, "feature_layers": [0]}])
def test_segmenter_ill_args(bad):
    with pytest.raises(ValueError):
        FratMAESegmenter(**{**ENC, **bad})


def _pretrain(tmp_path, **kw):
    src = FratMAE(patch_size=8, decoder_hidden_size=16, decoder_num_layers=1, decoder_num_heads=2,
                  decoder_mlp_dim=32, context_align=False, **{**ENC, **kw})  # fmt: skip
    path = tmp_path / "model.pt"
    torch.save(src.state_dict(), path)
    return src, path


@pytest.mark.parametrize("cls", [FratMAESegmenter, FratMAEClassifier])
def test_pretrained_encoders_load_and_report(tmp_path, cls):
    src, path = _pretrain(tmp_path)
    net = cls(patch_size=8, **ENC)
    head_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("encoders.")}
    report = load_fratmae_encoders(net, path)
    own = net.state_dict()
    for m in ("pet", "ct"):
        for k, v in src.encoders[m].state_dict().items():
            assert torch.equal(own[f"encoders.{m}.{k}"], v)
    assert len(report["loaded"]) == 2 * len(src.encoders["pet"].state_dict())
    assert set(report["not_in_checkpoint"]) == set(head_before)
    assert all(torch.equal(own[k], v) for k, v in head_before.items())  # the task head is untouched
    # a training checkpoint (model under "model") works the same
    torch.save({"model": src.state_dict(), "optimizer": {}}, tmp_path / "ckpt.pt")
    assert load_fratmae_encoders(cls(patch_size=8, **ENC), tmp_path / "ckpt.pt")["loaded"] == report["loaded"]
    # fine-tuned weights of one downstream model carry their encoders to another, by the same names
    torch.save(net.state_dict(), tmp_path / "finetuned.pt")
    other = FratMAEClassifier(patch_size=8, **ENC) if cls is FratMAESegmenter else FratMAESegmenter(patch_size=8, **ENC)
    load_fratmae_encoders(other, tmp_path / "finetuned.pt")
    assert all(torch.equal(other.state_dict()[k], own[k]) for k in report["loaded"])


def test_wrong_checkpoints_are_refused(tmp_path):
    net = FratMAESegmenter(patch_size=8, **ENC)
    other = torch.nn.Linear(3, 3)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    n_enc = sum(k.startswith("encoders.") for k in net.state_dict())
    refused = rf"other.pt is not a FratMAE pre-training checkpoint: it matches 0 of .* {n_enc} "
    with pytest.raises(ValueError, match=refused):
        load_fratmae_encoders(net, tmp_path / "other.pt")
    _, path = _pretrain(tmp_path, hidden_size=48, num_heads=4)  # another encoder width
    pre = torch.load(path, weights_only=True)
    same = 0  # encoder tensors of the same name and shape, counted by hand
    for k, v in net.state_dict().items():
        if k.startswith("encoders.") and k in pre and pre[k].shape == v.shape:
            same += 1
    assert 0 < same < n_enc
    before = {k: v.clone() for k, v in net.state_dict().items()}
    refused = rf"{path.name} does not fit this network's encoders: it matches {same} of {n_enc} "
    with pytest.raises(ValueError, match=refused):
        load_fratmae_encoders(net, path)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fratmae_encoders(net, tmp_path / "missing.pt")
