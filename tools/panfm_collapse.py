#!/usr/bin/env python
"""Where Pan-FM's demo pre-training collapses: per-step diagnostics of the self-distillation targets.

    python tools/panfm_collapse.py [--data DIR] [--subjects 96] [--steps 144] [--seed 0] [--every 12]
                                   [--invert-half] [--freeze-last-layer N] [--koleo W] [--pos-scale S]
                                   [--embed-norm] [--attention] [--shift N] [--view-noise S] [--shrink V]
                                   [--set KEY=VALUE ...]

Pre-trains ``train.json`` + ``demo.json`` in-process (same network, loss, optimizer, sampler, schedules and
:class:`medfm.engines.PanFMPretrainIteration` as the bundle; ``--set`` overrides config ids, e.g.
``--set momentum_start=0.9``) on the synthetic cohort (``--data``, generated with ``--subjects`` and seed 0 when
absent) and prints, every ``--every`` steps, with ``T`` the step's teacher temperature and ``c`` the CLS centre:

- ``cls``, ``patch``: the loss terms (log out_dim = the cross-entropy of two uniform distributions);
- ``H_t``: entropy of the teacher's CLS target ``softmax((t - c) / T)``; ``H_t_raw``: the same without the centre;
  ``H_s``: entropy of the student's softmax (temperature 0.1);
- ``MI_t``, ``MI_s``: how much the teacher target (student softmax) depends on the subject within the batch,
  ``H(mean_b q_b) - mean_b H(q_b)`` (0 = the same distribution for every subject);
- ``proto_cos``: mean cosine between distinct prototypes of the student's CLS head;
- ``d_student``: norm of the student's parameter change at that step.

Before training it prints the mean cosine similarity between subjects of the teacher's CLS feature and of its head's
bottleneck, on the subjects that have all organs (with ``input_centering``, on images centred by the cohort's mean
images, which the run's running means reach after one epoch). ``--invert-half`` replaces every second subject's
images ``x`` by ``1 - x`` (a large difference in content) to tell a too-small input difference from a broken
mechanism. Two variants that the bundle does not ship can be tried: ``--freeze-last-layer N`` drops the gradients of
the student heads' prototypes for the first N steps (DINO and iBOT freeze them during the first epoch), and
``--koleo W`` adds ``W`` times DINOv2's KoLeo term (``-mean_b log min_{b' != b} ||x_b - x_b'||`` over the
L2-normalised student CLS features of the batch) to the loss. Two encoder variants: ``--pos-scale S`` multiplies the
fixed sine-cosine position embeddings of student and teacher by ``S`` (0 removes them), and ``--embed-norm`` puts a
LayerNorm (one per branch, shared by the organs) after each organ's patch embedding.

``--attention`` also prints, at the same steps (and before training), for every block of the teacher on the subjects
with every organ, the CLS attention profile (:func:`attention_profile`: the normalised entropy of the token-normalised
organ shares, per head and over tokens, and the shares; the last block's shares are what SGM reads) and each organ's
reliance (:func:`organ_reliance`: how far the CLS moves when the organ is masked). Three variants of the views and
data: ``--shift N`` and ``--view-noise S`` give the teacher's and the student's pass each its own view (every image
rolled by up to N voxels per axis, Gaussian noise of sd S; :func:`view_variants`), and ``--shrink V`` pulls the
images of every organ but adipose and heart toward the cohort's mean image (``mean + V (x - mean)``).

At the end it prints the teacher's CLS target on the same subjects with every organ (one presence pattern, so any
difference between their targets comes from the images): ``MI_t`` over them, their mean ``H_t`` and the mean
cosine between their centred teacher logits. Within a training batch ``MI_t`` also counts differences that come
from which organs are present.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "panfm_panorgan" / "configs"


def entropy(q: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of ``q`` (N, K) (probabilities), in nats."""
    return -(q * q.clamp_min(1e-30).log()).sum(-1)


def subject_information(q: torch.Tensor) -> float:
    """``H(mean of the rows) - mean of the row entropies`` of ``q`` (N, K): 0 when every row is the same."""
    return float(entropy(q.mean(0)) - entropy(q).mean())


def mean_offdiag_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity between distinct rows of ``x`` (N, D), N >= 2."""
    z = F.normalize(x.float(), dim=-1)
    g = z @ z.T
    n = g.shape[0]
    return float((g.sum() - g.diagonal().sum()) / (n * n - n))


def koleo(x: torch.Tensor) -> torch.Tensor:
    """KoLeo term of DINOv2 over the rows of ``x`` (B, D), B >= 2: ``-mean_b log(min distance to another row)``
    after L2 normalisation."""
    z = F.normalize(x.float(), dim=-1)
    d = torch.cdist(z, z) + torch.eye(z.shape[0], device=z.device) * 1e9
    return -torch.log(d.min(1).values + 1e-8).mean()


def normalised_entropy(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``H(p) / log n`` of each row of ``p`` (..., K) over the ``n`` entries where ``keep`` (..., K) is True (rows
    with ``n < 2`` give NaN)."""
    p = torch.where(keep, p, torch.zeros_like(p))
    h = entropy(p)
    n = keep.sum(-1).to(p.dtype)
    return torch.where(n >= 2, h / n.clamp_min(2).log(), torch.full_like(h, float("nan")))


@torch.no_grad()
def attention_profile(encoder, images, present: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The CLS attention of every block of a :class:`~medfm.networks.nets.panfm.PanFMEncoder`, on its input.

    Per block: ``token`` (B,) mean over heads of the normalised entropy of the attention over the valid keys
    (CLS included; 1 = uniform per token); ``share`` (B, O) the token-normalised organ share of the attention
    averaged over heads (:func:`medfm.masking.organ_attention_share`, what SGM reads in the last block);
    ``organ`` (B,) its normalised entropy over the present organs; ``organ_heads`` (B,) the mean over heads of the
    same entropy computed per head (lower than ``organ`` when heads prefer different organs)."""
    from medfm.masking import organ_attention_share

    tokens, token_organ, _ = encoder.pack(images, present)
    b = tokens.shape[0]
    valid = torch.cat([token_organ.new_ones(b, 1, dtype=torch.bool), token_organ >= 0], 1)
    x = torch.cat([encoder.cls_token.expand(b, -1, -1), tokens], 1)
    key_mask = None if bool(valid.all()) else valid
    _, outs = encoder.blocks(x, list(range(encoder.num_layers)), attn_mask=key_mask)
    rows = []
    for block, inp in zip(encoder.blocks, [x, *outs[:-1]]):
        att = block.cls_attention(inp, key_mask)  # (B, H, N)
        heads = att.shape[1]
        share = organ_attention_share(att.mean(1)[:, 1:], token_organ, present)
        per_head = torch.stack([organ_attention_share(att[:, h, 1:], token_organ, present) for h in range(heads)], 1)
        rows.append({
            "token": normalised_entropy(att, valid[:, None, :].expand_as(att)).mean(1), "share": share,
            "organ": normalised_entropy(share, present),
            "organ_heads": normalised_entropy(per_head, present[:, None, :].expand_as(per_head)).mean(1),
        })  # fmt: skip
    return rows


@torch.no_grad()
def organ_reliance(encoder, images, present: torch.Tensor) -> torch.Tensor:
    """(O,) how far the CLS of each subject moves when one of its organs is masked (its tokens become the mask
    token, as SGM and random masking do), ``||cls - cls_without_o||``, averaged over the subjects that have the
    organ and at least one other, divided by the mean distance between the CLS of two distinct subjects."""
    base = encoder(images, present).cls
    b = base.shape[0]
    spread = torch.cdist(base, base).sum() / max(1, b * b - b)
    out = []
    for o in range(present.shape[1]):
        hide = torch.zeros_like(present)
        hide[:, o] = True
        rows = present[:, o] & (present.sum(1) >= 2)
        moved = (encoder(images, present, organ_mask=hide).cls - base).norm(dim=1)
        out.append(moved[rows].mean() / spread if bool(rows.any()) else torch.tensor(float("nan")))
    return torch.stack(out)


class _NormedEmbed(torch.nn.Module):
    """A patch embedding followed by a LayerNorm over its tokens (``--embed-norm``)."""

    def __init__(self, embed: torch.nn.Module, norm: torch.nn.LayerNorm) -> None:
        super().__init__()
        self.embed, self.norm = embed, norm

    def forward(self, x: torch.Tensor, *args):
        tok, grid = self.embed(x, *args)
        return self.norm(tok), grid


def _change_encoder(net, pos_scale: float, embed_norm: bool) -> None:
    """Scale the position embeddings of both branches by ``pos_scale``; with ``embed_norm`` give each branch a
    LayerNorm after its patch embeddings (the teacher a copy of the student's, so EMA keeps them paired)."""
    import copy

    for branch in (net.student, net.teacher):
        enc = branch.encoder
        for o in enc.organs:
            getattr(enc, f"pos_{o}").mul_(pos_scale)
    if embed_norm:
        norm = torch.nn.LayerNorm(net.student.encoder.hidden_size, eps=1e-6)
        for branch, ln in ((net.student, norm), (net.teacher, copy.deepcopy(norm).requires_grad_(False))):
            for o in branch.encoder.organs:
                branch.encoder.patch_embed[o] = _NormedEmbed(branch.encoder.patch_embed[o], ln)


def view_variants(net, shift: int, noise: float, seed: int) -> None:
    """Give the teacher's and the student's pass each its own view (``--shift``, ``--view-noise``): every organ image
    of every subject rolled by up to ``shift`` voxels along each axis, plus Gaussian noise of sd ``noise``, drawn
    anew for each pass (so the two views of a step differ)."""
    gen = torch.Generator().manual_seed(10_000 + seed)

    def view(images):
        out = {}
        for organ, x in images.items():
            x = x.clone()
            if shift:
                for b in range(x.shape[0]):
                    s = torch.randint(-shift, shift + 1, (x.ndim - 2,), generator=gen).tolist()
                    x[b] = torch.roll(x[b], s, dims=tuple(range(1, x.ndim - 1)))
            out[organ] = x + noise * torch.randn(x.shape, generator=gen) if noise else x
        return out

    teacher, student = net.forward_teacher, net.forward
    net.forward_teacher = lambda images, present: teacher(view(images), present)
    net.forward = lambda images, present, organ_mask=None: student(view(images), present, organ_mask)


def _shrink(items: list[dict], organs: Sequence[str], keep: Sequence[str], factor: float) -> None:
    """``--shrink``: each image of an organ not in ``keep`` becomes ``mean + factor (x - mean)``, with ``mean`` the
    cohort's mean image of that organ (0: the organ looks the same in every subject)."""
    for o in organs:
        if o in keep:
            continue
        have = [it for it in items if bool(torch.as_tensor(it["present"])[list(organs).index(o)])]
        if have:
            mean = torch.stack([torch.as_tensor(it["image_" + o]) for it in have]).mean(0)
            for it in have:
                it["image_" + o] = mean + factor * (torch.as_tensor(it["image_" + o]) - mean)


def _print_attention(net, batch, organs: Sequence[str], step: int | str) -> None:
    """``--attention``: the teacher's CLS attention profile and organ reliance on the subjects with every organ."""
    images, present = {o: batch["image_" + o].float() for o in organs}, batch["present"].bool()
    encoder = net.teacher.encoder
    for i, r in enumerate(attention_profile(encoder, images, present)):
        print(f"attn {step} block {i}: organ entropy {float(r['organ'].mean()):.4f}, per head "
              f"{float(r['organ_heads'].mean()):.4f}, over tokens {float(r['token'].mean()):.4f}, share "
              + " ".join(f"{o}={v:.3f}" for o, v in zip(organs, r["share"].mean(0).tolist())))  # fmt: skip
    reliance = organ_reliance(encoder, images, present)
    print(f"reliance {step}: " + " ".join(f"{o}={v:.2f}" for o, v in zip(organs, reliance.tolist())), flush=True)


def _add_variants(net, loss, optimizer, state, freeze_steps: int, koleo_weight: float) -> None:
    """Wrap the optimizer step (prototype gradients dropped while ``state.iteration <= freeze_steps``) and the
    loss (plus ``koleo_weight`` x KoLeo of the student CLS features, read by a hook on the student's head)."""
    heads = [h for h in (net.student.head, net.student.patch_head) if h is not None]
    step = optimizer.step

    def frozen_step(*a, **k):
        if state.iteration <= freeze_steps:
            for h in heads:
                h.last_v.grad = None
        return step(*a, **k)

    optimizer.step = frozen_step
    if koleo_weight > 0:
        seen: dict[str, torch.Tensor] = {}
        net.student.head.register_forward_hook(lambda m, inp, out: seen.__setitem__("cls", inp[0]))
        terms = loss.forward_terms

        def with_koleo(student, teacher, teacher_temp):
            out = terms(student, teacher, teacher_temp)
            out["loss"] = out["loss"] + koleo_weight * koleo(seen["cls"])
            return out

        loss.forward_terms = with_koleo


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="cohort folder (default: a temporary one)")
    p.add_argument("--subjects", type=int, default=96, help="cohort size when it is generated (default 96)")
    p.add_argument("--steps", type=int, default=144, help="pre-training steps (default 144)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and masks")
    p.add_argument("--every", type=int, default=12, help="print every this many steps (and steps 1-3)")
    p.add_argument("--invert-half", action="store_true", help="x -> 1 - x for every second subject's images")
    p.add_argument("--freeze-last-layer", type=int, default=0, help="steps with frozen prototypes (default 0)")
    p.add_argument("--koleo", type=float, default=0.0, help="weight of a KoLeo term on the student CLS (default 0)")
    p.add_argument("--pos-scale", type=float, default=1.0, help="factor on the position embeddings (default 1)")
    p.add_argument("--embed-norm", action="store_true", help="LayerNorm after the patch embeddings")
    p.add_argument("--attention", action="store_true", help="print the teacher's CLS attention profile too")
    p.add_argument("--shift", type=int, default=0, help="per-view roll of every image by up to N voxels per axis")
    p.add_argument("--view-noise", type=float, default=0.0, help="per-view Gaussian noise of this sd (default 0)")
    p.add_argument("--shrink", type=float, default=1.0,
                   help="non-dominant organs' images pulled toward the cohort mean by this factor (default 1: none)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (Python literals)")
    args = p.parse_args(argv)
    import tempfile

    from monai.bundle import ConfigParser
    from monai.data import Dataset
    from monai.optimizers import WarmupCosineSchedule
    from monai.utils import set_determinism
    from torch.utils.data import default_collate

    from medfm.data import generate_synthetic_panfm, read_subject_table

    tmp = tempfile.TemporaryDirectory(prefix="panfm_collapse_")
    data = args.data or os.path.join(tmp.name, "data")
    if not os.path.isfile(os.path.join(data, "subjects.csv")):
        generate_synthetic_panfm(data, num_subjects=args.subjects, seed=0)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")])
    parser["dataset_dir"], parser["output_dir"], parser["seed"] = data, tmp.name, args.seed
    parser["train#datalist"] = "$medfm.data.read_subject_table(@dataset_dir)"
    for item in args.set:
        key, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}.")
        parser[key] = ast.literal_eval(value)
    set_determinism(seed=args.seed)
    net = parser.get_parsed_content("network_def")
    _change_encoder(net, args.pos_scale, args.embed_norm)
    loss = parser.get_parsed_content("loss_def")
    optimizer = parser.get_parsed_content("optimizer")
    iteration = parser.get_parsed_content("train#iteration")
    sampler = parser.get_parsed_content("train#batch_sampler")
    organs = list(parser.get_parsed_content("organs"))
    dataset = Dataset(read_subject_table(data), parser.get_parsed_content("train#preprocessing"))
    items = [dataset[i] for i in range(len(dataset))]
    if args.invert_half:
        for item in items[1::2]:
            for o in organs:
                item["image_" + o] = 1 - item["image_" + o]
    if args.shrink != 1.0:
        _shrink(items, organs, ("adipose", "heart"), args.shrink)
    epochs = max(1, -(-args.steps // len(sampler)))
    iteration.total_steps = epochs * len(sampler)
    scheduler = WarmupCosineSchedule(optimizer, parser.get_parsed_content("warmup_steps"), iteration.total_steps)
    state = types.SimpleNamespace(iteration=0, max_epochs=epochs, epoch_length=len(sampler), device=torch.device("cpu"))
    engine = types.SimpleNamespace(network=net, optimizer=optimizer, loss_function=loss, non_blocking=False,
                                   prepare_batch=parser.get_parsed_content("train#prepare_batch"), to_kwargs={},
                                   optim_set_to_none=True, fire_event=lambda event: None, state=state)  # fmt: skip

    _add_variants(net, loss, optimizer, state, args.freeze_last_layer, args.koleo)
    if args.shift or args.view_noise:
        view_variants(net, args.shift, args.view_noise, args.seed)
    full = [it for it in items if bool(torch.as_tensor(it["present"]).all())][:16]
    batch = default_collate(full) if len(full) >= 2 else None
    if batch is not None:
        encoder = net.teacher.encoder
        if getattr(net, "input_centering", False):  # the mean images the run reaches after one epoch
            import copy

            encoder = copy.deepcopy(encoder)
            every = default_collate(items)
            encoder.update_input_mean({o: every["image_" + o].float() for o in organs}, every["present"].bool())
        with torch.no_grad():
            out = encoder({o: batch["image_" + o].float() for o in organs}, batch["present"].bool())
            print(f"init, {len(full)} subjects with every organ: mean cosine between subjects of the teacher's CLS "
                  f"{mean_offdiag_cosine(out.cls):.4f}, of its head bottleneck "
                  f"{mean_offdiag_cosine(net.teacher.head.mlp(out.cls)):.4f}")  # fmt: skip
    print(f"lr {optimizer.param_groups[0]['lr']:.2e}, {iteration.total_steps} steps, log out_dim "
          f"{torch.log(torch.tensor(float(loss.cls_loss.center.shape[1]))):.3f}")  # fmt: skip
    if args.attention and batch is not None:
        _print_attention(net, batch, organs, "init")
    print("step    cls  patch      T    H_t  H_t_raw    H_s   MI_t   MI_s  proto_cos  d_student")
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for idx in sampler:
            state.iteration += 1
            before = [q.detach().clone() for q in net.student.parameters()]
            out = iteration(engine, default_collate([items[i] for i in idx]))
            scheduler.step()
            n = state.iteration
            if n <= 3 or n % args.every == 0 or n == args.steps:
                t, s = out["pred"]["teacher_cls"].float(), out["pred"]["student_cls"].float()
                temp = out["terms"]["teacher_temp"]
                centre = loss.cls_loss.center
                q_t, q_s = F.softmax((t - centre) / temp, -1), F.softmax(s / loss.cls_loss.student_temp, -1)
                moved = sum(float((a.detach() - b).norm() ** 2) for a, b in zip(net.student.parameters(), before))
                print(f"{n:4d} {out['terms']['cls']:6.3f} {out['terms']['patch']:6.3f} {temp:6.3f} "
                      f"{float(entropy(q_t).mean()):6.2f} {float(entropy(F.softmax(t / temp, -1)).mean()):8.2f} "
                      f"{float(entropy(q_s).mean()):6.2f} {subject_information(q_t):6.3f} "
                      f"{subject_information(q_s):6.3f} "
                      f"{mean_offdiag_cosine(net.student.head.last_weight().detach()):10.3f} {moved ** 0.5:10.4f}",
                      flush=True)  # fmt: skip
                if args.attention and batch is not None:
                    _print_attention(net, batch, organs, n)
            if n >= args.steps:
                break
        if state.iteration >= args.steps:
            break
    if batch is not None:
        _print_final(net, loss, batch, organs, out["terms"]["teacher_temp"])
    tmp.cleanup()
    return 0


@torch.no_grad()
def _print_final(net, loss, batch, organs: Sequence[str], temp: float) -> None:
    """The teacher's CLS target on the subjects with every organ (differences from the images only)."""
    net.eval()  # the teacher computes as in training; evaluation mode only keeps its mean images as they are
    t = net.forward_teacher({o: batch["image_" + o].float() for o in organs}, batch["present"].bool())
    t = t["cls_logits"].float()
    q = F.softmax((t - loss.cls_loss.center) / temp, -1)
    print(f"end, {t.shape[0]} subjects with every organ: MI_t {subject_information(q):.3f}, H_t "
          f"{float(entropy(q).mean()):.2f}, mean cosine between subjects of the centred teacher logits "
          f"{mean_offdiag_cosine(t - t.mean(0)):.3f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
