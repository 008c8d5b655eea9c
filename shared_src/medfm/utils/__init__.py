from .bundle import bundle_root, default_device
from .dist import all_gather_cat, get_rank, get_world_size, in_process_group, is_distributed, rank_generator, unwrap
from .files import atomic_path
from .hub import hub_card_header, write_hub_layout
from .optim import weight_decay_groups
from .release import check_weights_fit, download_bundle, load_bundle, package_bundle, safe_extract, sha256_file
from .serve import SERVED, ServedTask, build_served_bundle, merged_config
from .speed import speed_switches

__all__ = [
    "SERVED",
    "all_gather_cat",
    "get_rank",
    "get_world_size",
    "in_process_group",
    "rank_generator",
    "unwrap",
    "ServedTask",
    "atomic_path",
    "build_served_bundle",
    "bundle_root",
    "check_weights_fit",
    "default_device",
    "download_bundle",
    "hub_card_header",
    "is_distributed",
    "load_bundle",
    "merged_config",
    "package_bundle",
    "safe_extract",
    "sha256_file",
    "speed_switches",
    "weight_decay_groups",
    "write_hub_layout",
]
