"""tools/panfm_collapse.py: its measures against hand computations, and a two-step run on a tiny cohort."""

from __future__ import annotations

import math

import pytest
import torch

from . import load_tool


@pytest.fixture(scope="module")
def module():
    return load_tool("panfm_collapse")


def test_subject_information_and_cosine(module):
    same = torch.full((3, 4), 0.25)
    assert module.subject_information(same) == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.eye(4)  # four subjects, each sure of its own prototype: H(mean) = log 4, H(rows) = 0
    assert module.subject_information(one_hot) == pytest.approx(math.log(4), rel=1e-6)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    pairs = [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]  # (0, 1), (0, 2), (1, 2)
    assert module.mean_offdiag_cosine(x) == pytest.approx(sum(pairs) / 3, rel=1e-6)
    # KoLeo: after normalisation every row's nearest other row is at distance sqrt(2) -> -log sqrt(2)
    points = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert float(module.koleo(points)) == pytest.approx(-0.5 * math.log(2), rel=1e-5)


@pytest.mark.slow
def test_two_steps_print_every_column(module, tmp_path, capsys):
    args = ["--data", str(tmp_path / "data"), "--subjects", "16", "--steps", "2", "--freeze-last-layer", "1"]
    assert module.main([*args, "--koleo", "0.1", "--pos-scale", "0.1", "--embed-norm"]) == 0
    out = capsys.readouterr().out
    assert "mean cosine between subjects of the teacher's CLS" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("1", "2")]
    assert [r[0] for r in rows] == ["1", "2"] and all(len(r) == 11 for r in rows)
    assert all(0.0 <= float(r[4]) <= math.log(256) + 1e-3 for r in rows)  # H_t within [0, log out_dim]
    assert float(rows[0][10]) > 0  # the student moved
    end = [line for line in out.splitlines() if line.startswith("end, ")]
    assert len(end) == 1 and "subjects with every organ: MI_t" in end[0]
    assert 0.0 <= float(end[0].split("MI_t ")[1].split(",")[0]) <= math.log(256) + 1e-3


def _two_organ_net():
    """A one-block PanFMSelfDistill over brain (8, 8, 8) and heart (8, 8, 4), patch 4, seed 0, and its shapes."""
    from medfm.networks.nets import PanFMSelfDistill

    torch.manual_seed(0)
    shapes = {"brain": (8, 8, 8), "heart": (8, 8, 4)}
    net = PanFMSelfDistill(
        ("brain", "heart"), shapes, patch_size=4, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
        out_dim=8, patch_out_dim=8, head_hidden_dim=8, head_bottleneck_dim=4,
    )  # fmt: skip
    return shapes, net


def test_encoder_variants_scale_positions_and_norm_patch_tokens(module):
    from medfm.networks.blocks import sincos_pos_embed
    shapes, net = _two_organ_net()
    module._change_encoder(net, 0.25, True)
    for branch in (net.student, net.teacher):
        assert torch.allclose(branch.encoder.pos_brain, 0.25 * sincos_pos_embed((2, 2, 2), 16))
        assert torch.allclose(branch.encoder.pos_heart, 0.25 * sincos_pos_embed((2, 2, 1), 16))
    images = {o: torch.rand(2, 1, *s) for o, s in shapes.items()}
    present = torch.ones(2, 2, dtype=torch.bool)
    enc = net.student.encoder
    tokens, organ, _ = enc.pack(images, present)
    content = tokens - enc.organ_embed[organ]  # remove the organ embedding, then the positions
    content[:, :8] -= enc.pos_brain
    content[:, 8:] -= enc.pos_heart
    # a LayerNorm with its initial affine (1, 0): every patch token has mean 0 and (biased) variance 1
    assert torch.allclose(content.mean(-1), torch.zeros(2, 12), atol=1e-5)
    assert torch.allclose(content.var(-1, unbiased=False), torch.ones(2, 12), atol=1e-3)
    s_params, t_params = list(net.student.parameters()), list(net.teacher.parameters())
    assert [p.shape for p in s_params] == [p.shape for p in t_params]  # EMA pairs them one to one
    assert all(not p.requires_grad for p in t_params)
    assert s_params[0] is not t_params[0] and net.student.encoder.patch_embed["brain"].norm is not (
        net.teacher.encoder.patch_embed["brain"].norm
    )


def _run_rows(module, capsys, data, extra=()):
    """Run the demo pre-training (32 subjects, 48 steps) and parse the printed rows and the end-of-run line."""
    assert module.main(["--data", str(data), "--subjects", "32", "--steps", "48", "--every", "8", *extra]) == 0
    out = capsys.readouterr().out
    rows = [[float(v) for v in line.split()] for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    end = next(line for line in out.splitlines() if line.startswith("end, "))
    return rows, float(end.split("MI_t ")[1].split(",")[0]), float(end.split("H_t ")[1].split(",")[0])


@pytest.mark.slow
def test_demo_pretraining_does_not_collapse(module, tmp_path, capsys):
    """The shipped demo recipe (train.json + demo.json), 48 steps on a 32-subject synthetic cohort: both loss terms
    end clearly below log out_dim (256 prototypes: what a collapsed, uniform target and student give), and the
    teacher's target on the subjects with every organ depends on their images. The same run without the input
    centring and with the full position embedding collapses."""
    uniform = math.log(256)
    rows, mi, h = _run_rows(module, capsys, tmp_path / "data")
    late = [r for r in rows if r[0] >= 16]  # after the teacher-temperature warm-up (16 steps)
    assert len(late) == 5
    assert sum(r[1] for r in late) / len(late) < uniform - 0.5  # cls
    assert sum(r[2] for r in late) / len(late) < uniform - 0.4  # patch
    assert mi > 0.3 and h < uniform - 0.5
    old = ["--set", "network_def#input_centering=False", "network_def#pos_embed_scale=1.0"]
    rows, mi, h = _run_rows(module, capsys, tmp_path / "data", old)
    late = [r for r in rows if r[0] >= 16]
    assert sum(r[2] for r in late) / len(late) > uniform - 0.2 and mi < 0.05 and h > uniform - 0.05


def _tiny_encoder():
    from medfm.networks.nets import PanFMEncoder

    torch.manual_seed(0)
    shapes = {"brain": (8, 8, 8), "heart": (8, 4, 4), "liver": (4, 4, 8)}
    enc = PanFMEncoder(tuple(shapes), shapes, patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
    with torch.no_grad():  # larger q/k weights than at initialisation, so that the attention is far from uniform
        for block in enc.blocks:
            block.attn.qkv.weight.mul_(20)
    images = {o: torch.randn(3, 1, *s) for o, s in shapes.items()}
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])
    return enc.eval(), images, present


def _naive_cls_attention(block, x):
    """(H, N) CLS attention of one subject's block input x (N, C), by hand from the block's weights."""
    c, h = x.shape[1], block.attn.num_heads
    y = block.norm1(x)
    w, bias = block.attn.qkv.weight, block.attn.qkv.bias
    q, k = y[0] @ w[:c].T + bias[:c], y @ w[c : 2 * c].T + bias[c : 2 * c]
    d = c // h
    rows = []
    for head in range(h):
        logits = [float(q[head * d : (head + 1) * d] @ k[j, head * d : (head + 1) * d]) / math.sqrt(d) for j in
                  range(x.shape[0])]  # fmt: skip
        e = [math.exp(v - max(logits)) for v in logits]
        rows.append([v / sum(e) for v in e])
    return rows


def _entropy(p):
    return -sum(v * math.log(v) for v in p if v > 0) / math.log(len(p))


def _shares(att, owner, present, order):
    """Mean attention per token of each present organ, normalised to sum to 1 (owner: organ index per key, -1 CLS)."""
    per = {o: [att[j] for j in range(len(att)) if owner[j] == order.index(o)] for o in present}
    per = {o: sum(v) / len(v) for o, v in per.items()}
    return {o: v / sum(per.values()) for o, v in per.items()}


def test_attention_profile_matches_a_per_subject_hand_computation(module):
    """Every block's CLS attention, recomputed one subject at a time (no padding) from the block's weights: the
    organ shares (mean per token, normalised), their entropies (head mean first, and per head) and the entropy
    over tokens. The last block's shares are what the network hands to SGM."""
    enc, images, present = _tiny_encoder()
    with torch.no_grad():
        rows = module.attention_profile(enc, images, present)
        sgm_input = enc(images, present, return_attention=True).organ_attention
    assert len(rows) == 2
    assert torch.allclose(rows[-1]["share"], sgm_input, atol=1e-6)
    for b in range(3):
        organs = [o for o, on in zip(enc.organs, present[b].tolist()) if on]
        with torch.no_grad():
            tokens, token_organ, _ = enc.pack({o: v[b : b + 1] for o, v in images.items()}, present[b : b + 1])
            x = torch.cat([enc.cls_token[0], tokens[0]])
            owner = [-1] + token_organ[0].tolist()
            for depth, block in enumerate(enc.blocks):
                att = _naive_cls_attention(block, x)
                mean_att = [sum(col) / len(att) for col in zip(*att)]

                share = _shares(mean_att, owner, organs, enc.organs)
                got = rows[depth]
                for o in enc.organs:
                    want = share.get(o, 0.0)
                    assert float(got["share"][b, enc.organs.index(o)]) == pytest.approx(want, abs=1e-5)
                assert float(got["token"][b]) == pytest.approx(sum(_entropy(a) for a in att) / len(att), abs=1e-5)
                if len(organs) >= 2:
                    assert float(got["organ"][b]) == pytest.approx(_entropy(list(share.values())), abs=1e-5)
                    heads = [_entropy(list(_shares(a, owner, organs, enc.organs).values())) for a in att]
                    per_head = sum(heads) / len(heads)
                    assert float(got["organ_heads"][b]) == pytest.approx(per_head, abs=1e-5)
                else:
                    assert math.isnan(float(got["organ"][b])) and math.isnan(float(got["organ_heads"][b]))
                x = block(x[None])[0]
    assert float(rows[-1]["organ"][0]) < 0.99  # the hand-made weights give a non-uniform case


def test_organ_reliance_matches_a_loop_over_subjects(module):
    enc, images, present = _tiny_encoder()
    with torch.no_grad():
        got = module.organ_reliance(enc, images, present)

        def cls(b, hide=None):
            mask = None if hide is None else torch.tensor([[o == hide for o in range(3)]])
            return enc({o: v[b : b + 1] for o, v in images.items()}, present[b : b + 1], mask).cls[0]

        base = [cls(b) for b in range(3)]
        spread = sum(float((base[i] - base[j]).norm()) for i in range(3) for j in range(3) if i != j) / 6
        for o in range(3):
            rows = [b for b in range(3) if present[b, o] and int(present[b].sum()) >= 2]
            want = sum(float((cls(b, o) - base[b]).norm()) for b in rows) / len(rows) / spread
            assert float(got[o]) == pytest.approx(want, rel=1e-4)
    assert float(got[1]) > 0  # the heart: only subject 0 counts (subject 2 has no other organ)


def test_view_variants_give_teacher_and_student_their_own_rolled_views(module):
    """``--shift`` / ``--view-shift``: each pass sees every subject's organ image rolled by at most ``shift`` voxels
    per axis (found by trying every roll), drawn anew per pass, so teacher and student views differ; the batch
    itself is left as it is. ``--view-noise`` adds noise of the given sd on top."""
    import itertools

    shapes, net = _two_organ_net()
    seen = []
    teacher, student = net.forward_teacher, net.forward
    net.forward_teacher = lambda images, present: seen.append(images) or teacher(images, present)
    net.forward = lambda images, present, organ_mask=None: seen.append(images) or student(images, present, organ_mask)
    module.view_variants(net, 1, 0.0, seed=0)
    images = {o: torch.rand(4, 1, *s) for o, s in shapes.items()}
    kept = {o: v.clone() for o, v in images.items()}
    present = torch.ones(4, 2, dtype=torch.bool)
    net.forward_teacher(images, present)
    net(images, present, None)
    assert all(torch.equal(images[o], kept[o]) for o in shapes)
    rolls = list(itertools.product((-1, 0, 1), repeat=3))
    found = []
    for view in seen:
        for o in shapes:
            for b in range(4):
                match = [r for r in rolls if torch.equal(view[o][b], torch.roll(kept[o][b], r, dims=(1, 2, 3)))]
                assert match, (o, b)
                found.append(match[0])
    assert found[: len(found) // 2] != found[len(found) // 2 :]  # the student's view is not the teacher's
    assert len(set(found)) > 3
    module.view_variants(net, 0, 0.1, seed=0)  # noise of sd 0.1 on top (a constant image: rolls leave it as is)
    net.forward_teacher({o: torch.full((4, 1, *s), 0.5) for o, s in shapes.items()}, present)
    noise = torch.cat([(seen[-1][o] - 0.5).flatten() for o in shapes])
    assert float(noise.std()) == pytest.approx(0.1, rel=0.1) and abs(float(noise.mean())) < 0.02
