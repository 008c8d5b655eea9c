"""Every bundle's configs, checked without training: each file is JSON with a 4-space indent, each supported
combination of files resolves every ``@id`` it refers to, ``metadata.json`` validates against the model zoo's
schema, and MONAI's ``check_properties`` finds nothing missing.

The combinations come from one table (``COMBINATIONS`` below: files merged in order, the workflow type MONAI
checks, overrides), from the served tasks in ``medfm.utils.SERVED``, and from the ``--config_file`` lists each
bundle's ``docs/README.md`` shows; every config file of a bundle must appear in at least one of them.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver

from medfm.utils import SERVED

from .helpers import REPO, SCHEMA, configs, one_process_group_env, workflow

BUNDLES = sorted(
    os.path.basename(os.path.dirname(os.path.dirname(p)))
    for p in glob.glob(os.path.join(REPO, "bundles", "*", "configs", "metadata.json"))
)
STAGE = ("finetune_seg.json", "finetune_stage.json", "demo_seg.json", "demo_stage.json")  # FratMAE's staging
NONE = "none"  # a pre-trained checkpoint the fine-tuning configs skip (as ``--pretrained_checkpoint none``)

# Each bundle's supported config combinations: (files merged in order, workflow type, overrides). An override
# "untrained:<id>" is the file of the randomly initialised weights of network ``<id>`` of the same combination.
# ``ckpt_path`` of an inference combination may name a file that does not exist: nothing is loaded before a run.
COMBINATIONS: dict[str, list[tuple[tuple[str, ...], str, dict[str, Any]]]] = {
    "fratmae_petct": [
        (("train.json",), "train", {}),
        (("train.json", "demo.json"), "train", {}),
        (("train.json", "multi_gpu_train.json"), "train", {}),
        (("train.json", "demo.json", "mae.json"), "train", {}),
        (("train.json", "demo.json", "mae_contextalign.json"), "train", {}),
        (("train.json", "demo.json", "fratmae_no_contextalign.json"), "train", {}),
        (("train.json", "demo.json", "axial.json"), "train", {}),
        (("finetune_seg.json", "demo_seg.json"), "train", {"pretrained_checkpoint": NONE}),
        (("finetune_seg.json", "demo_seg.json", "multi_gpu_finetune.json"), "train", {"pretrained_checkpoint": NONE}),
        (STAGE, "train", {"pretrained_checkpoint": NONE}),
        ((*STAGE, "evaluate_stage.json"), "infer", {"ckpt_path": "none.pt"}),
        (("inference.json", "demo_inference.json"), "infer", {"ckpt_path": "none.pt"}),
        (("inference.json", "evaluate.json", "demo_inference.json"), "infer", {"ckpt_path": "none.pt"}),
    ],
    "spad_vit": [
        (("train.json", "demo.json", "train_tokenizer.json", "demo_tokenizer.json"), "train", {}),
        (("train.json", "demo.json"), "train", {"tokenizer_ckpt": "untrained:tokenizer_def"}),
        (("train.json", "demo.json", "multi_gpu_train.json"), "train", {"tokenizer_ckpt": "untrained:tokenizer_def"}),
        (("finetune_seg.json", "demo.json", "demo_seg.json"), "train", {"pretrained_checkpoint": NONE}),
        (("finetune_seg.json", "demo.json", "demo_seg.json", "multi_gpu_finetune.json"), "train",
         {"pretrained_checkpoint": NONE}),
        (("finetune_seg.json", "finetune_cls.json", "demo.json", "demo_cls.json"), "train",
         {"pretrained_checkpoint": NONE}),
        (("inference.json", "demo_inference.json"), "infer", {"ckpt_path": "none.pt"}),
        (("inference.json", "evaluate.json", "demo_inference.json"), "infer", {"ckpt_path": "none.pt"}),
    ],
    "panfm_panorgan": [
        (("train.json", "demo.json"), "train", {}),
        (("train.json", "demo.json", "multi_gpu_train.json"), "train", {}),
        (("train.json", "demo.json", "masking_random.json"), "train", {}),
        (("train.json", "demo.json", "masking_sgm.json"), "train", {}),
        (("finetune.json", "demo_finetune.json"), "train", {"pretrained_checkpoint": NONE}),
        (("finetune.json", "demo_finetune.json", "multi_gpu_finetune.json"), "train", {"pretrained_checkpoint": NONE}),
        (("finetune.json", "linear_probe.json", "demo_finetune.json"), "train", {"pretrained_checkpoint": NONE}),
        (("inference.json", "demo_inference.json"), "infer", {"ckpt_path": "none.pt"}),
        (("inference.json", "evaluate.json", "demo_inference.json"), "infer", {"ckpt_path": "none.pt"}),
    ],
    "midol_multimodal": [
        (("train.json", "demo.json"), "train", {}),
        (("train.json", "demo.json", "no_routing.json"), "train", {}),
        (("train.json", "demo.json", "multi_gpu_train.json"), "train", {}),
        (("finetune_seg.json", "finetune_cls.json", "demo_seg.json", "demo_cls.json"), "train",
         {"pretrained_checkpoint": NONE}),
        (("finetune_seg.json", "finetune_cls.json", "linear_probe_cls.json", "demo_seg.json", "demo_cls.json"), "train",
         {"pretrained_checkpoint": NONE}),
        (("finetune_seg.json", "demo_seg.json"), "train", {"pretrained_checkpoint": NONE}),
        (("finetune_seg.json", "demo_seg.json", "multi_gpu_finetune.json"), "train", {"pretrained_checkpoint": NONE}),
        (("inference.json", "demo_inference.json"), "infer", {"ckpt_path": "none.pt"}),
        (("inference.json", "evaluate.json", "demo_inference.json"), "infer", {"ckpt_path": "none.pt"}),
    ],
}

def _config_files(bundle: str) -> list[str]:
    """Names of a bundle's JSON config files, ``metadata.json`` aside."""
    names = (os.path.basename(p) for p in glob.glob(configs(bundle, "*.json")[0]))
    return sorted(n for n in names if n != "metadata.json")


def _documented(bundle: str) -> set[tuple[str, ...]]:
    """The config lists the bundle's docs pass as ``--config_file "['…/a.json','…/b.json']"`` (or a single file)."""
    path = os.path.join(REPO, "bundles", bundle, "docs", "README.md")
    if not os.path.isfile(path):
        return set()
    text = open(path, encoding="utf-8").read()
    found = set()
    for arg in re.findall(r"--config_file[ =]+(\"\[[^\]]*\]\"|'\[[^\]]*\]'|[^\s\"']+\.json)", text):
        names = tuple(os.path.basename(p) for p in re.findall(r"[\w./$-]+\.json", arg))
        if names:
            found.add(names)
    return found


def _served(bundle: str) -> set[tuple[str, ...]]:
    """The merges ``medfm.utils.serve`` writes for MONAI Label: inference, train, and multi-GPU train over train."""
    found = set()
    for spec in SERVED.get(bundle, {}).values():
        for demo in (False, True):
            found.add(tuple(spec.inference_files(demo)))
            found.add(tuple(spec.train_files(demo)))
            found.add((*spec.train_files(demo), *spec.multi_gpu))
    return found


def _all_combinations(bundle: str) -> list[tuple[str, ...]]:
    table = {names for names, _, _ in COMBINATIONS.get(bundle, [])}
    return sorted(table | _served(bundle) | _documented(bundle))


def _combo_id(bundle: str, names: tuple[str, ...]) -> str:
    return f"{bundle}:" + "+".join(n[: -len(".json")] for n in names)


REF_CASES = [(b, names) for b in BUNDLES for names in _all_combinations(b)]
PROPERTY_CASES = [(b, *combo) for b in BUNDLES for combo in COMBINATIONS.get(b, [])]


def test_every_bundle_has_a_table_of_combinations():
    assert BUNDLES and set(BUNDLES) == set(COMBINATIONS), (BUNDLES, sorted(COMBINATIONS))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_config_is_json_with_4_space_indent(bundle):
    paths = glob.glob(configs(bundle, "*.json")[0])
    assert paths
    for path in paths:
        text = open(path, encoding="utf-8").read()
        json.loads(text)
        assert text.startswith('{\n    "'), path


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_config_file_is_checked_in_some_combination(bundle):
    used = {n for names in _all_combinations(bundle) for n in names}
    unknown = sorted(used - set(_config_files(bundle)))
    assert not unknown, f"{bundle}: combinations name config files that do not exist: {unknown}"
    unchecked = sorted(set(_config_files(bundle)) - used)
    assert not unchecked, f"{bundle}: config files in no combination of tests/bundles/test_configs.py: {unchecked}"


def _items(config: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Every (id, value) of a parsed config, nested ids joined with ``#``."""
    yield prefix, config
    children = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for k, v in children:
        yield from _items(v, f"{prefix}#{k}" if prefix else str(k))


@pytest.mark.parametrize("bundle,names", REF_CASES, ids=[_combo_id(b, n) for b, n in REF_CASES])
def test_every_reference_resolves(bundle, names):
    parser = ConfigParser()
    parser.read_config(configs(bundle, *names))
    parser.read_meta(configs(bundle, "metadata.json")[0])
    parser.parse(reset=True)  # macros and relative ids resolved; a macro naming a missing id raises here
    items = dict(_items(parser.get(), ""))
    ids = {ReferenceResolver.normalize_id(i) for i in items}
    missing = {}
    for where, value in items.items():
        if isinstance(value, str):
            for ref in ReferenceResolver.match_refs_pattern(value):  # MONAI's own reading of a reference
                if ReferenceResolver.normalize_id(ref) not in ids:
                    missing.setdefault(ref.replace(ReferenceResolver.sep, "#"), where)
    assert not missing, f"{names} refer to ids that do not exist (id: where): {missing}"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_multi_gpu_overlays_keep_the_per_sample_seeds(bundle):
    """A training sampler that seeds each sample's random transforms (``seed_samples``, for exact resumption and
    augmentation independent of the loading worker) still does under the matching multi-GPU overlay."""
    pairs = [("train.json", "multi_gpu_train.json"), ("finetune_seg.json", "multi_gpu_finetune.json")]
    checked = 0
    for base, overlay in pairs:
        files = configs(bundle, base, overlay)
        if not all(os.path.isfile(f) for f in files):
            continue
        single, multi = ConfigParser(), ConfigParser()
        single.read_config(files[:1])
        multi.read_config(files)
        if single.get("train#batch_sampler#seed_samples"):
            checked += 1
            assert multi.get("train#batch_sampler#seed_samples") is True, f"{bundle}: {overlay} turns it off"
    if bundle != "panfm_panorgan":  # Pan-FM's pre-training pipeline draws nothing per sample
        assert checked == 2


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_validates_against_the_schema(bundle):
    from monai.bundle import verify_metadata

    meta = configs(bundle, "metadata.json")[0]
    assert json.load(open(meta, encoding="utf-8"))["version"]
    if not os.path.isfile(SCHEMA):
        pytest.skip(f"metadata schema not found at {SCHEMA}")
    verify_metadata(meta_file=meta, filepath=SCHEMA)  # raises on any violation


def _network_source(parser: ConfigParser, net_id: str = "network_def") -> str | None:
    """The raw config of ``net_id`` and of every id it refers to, transitively, as one JSON string (``None`` when
    there is no ``net_id``): two parsed configs with the same source build the same network."""
    if net_id not in parser:
        return None
    found: dict[str, Any] = {}
    todo = [net_id]
    while todo:
        i = todo.pop()
        if i in found:
            continue
        found[i] = parser.get(i)
        for _, value in _items(found[i], i):
            if isinstance(value, str):
                todo += [ReferenceResolver.normalize_id(r).replace(ReferenceResolver.sep, "#")
                         for r in ReferenceResolver.match_refs_pattern(value)]  # fmt: skip
    return json.dumps(found, sort_keys=True)


@pytest.fixture(scope="module")
def built_networks() -> Iterator[dict[str, torch.nn.Module]]:
    """``network_def`` instances by :func:`_network_source`, for the combinations that share one: FratMAE's
    full-size network (288 M parameters) is built once for ``train`` and ``train+multi_gpu_train``."""
    cache: dict[str, torch.nn.Module] = {}
    yield cache
    cache.clear()


@pytest.mark.parametrize(
    "bundle,names,kind,override", PROPERTY_CASES, ids=[_combo_id(b, n) for b, n, _, _ in PROPERTY_CASES]
)
def test_check_properties_nothing_missing(bundle, names, kind, override, demo_data, tmp_path, monkeypatch,
                                          built_networks):  # fmt: skip
    data = demo_data(bundle)
    override = dict(override)
    for key, value in override.items():
        if isinstance(value, str) and value.startswith("untrained:"):
            parser = ConfigParser()
            parser.read_config(configs(bundle, *names))
            parser.update({"dataset_dir": data, "output_dir": str(tmp_path / "untrained")})
            torch.manual_seed(0)
            override[key] = str(tmp_path / f"{key}.pt")
            torch.save(parser.get_parsed_content(value.split(":", 1)[1]).state_dict(), override[key])
        elif key == "ckpt_path":
            override[key] = str(tmp_path / value)
    if any(n.startswith("multi_gpu") for n in names):  # a one-process group, as torchrun would set up
        one_process_group_env(monkeypatch)
    wf = workflow(bundle, list(names), workflow_type=kind, dataset_dir=data, output_dir=str(tmp_path / "out"),
                  **override)  # fmt: skip
    wf.initialize()
    source = _network_source(wf.parser)
    resolved = wf.parser.ref_resolver.resolved_content
    if source in built_networks:  # the same constructor call built this network in an earlier combination
        resolved["network_def"] = built_networks[source]
    try:
        assert wf.check_properties() == []
    finally:
        wf.finalize()
    if source is not None and isinstance(resolved.get("network_def"), torch.nn.Module):
        built_networks[source] = resolved["network_def"]
