"""The run record a checkpoint keeps in its common state: the configuration that wrote it, under
a schema version, so that renaming or adding a config field does not break older checkpoints.

    {"checkpoint_version": SCHEMA, "config": dataclasses.asdict(TrainConfig), ...run state}

A checkpoint of an older schema is read through ``MIGRATIONS`` (version N -> N + 1, one pure
function each) up to today's; one of a newer or unknown schema is one line. A change to any
config class (a field added, renamed or removed) needs SCHEMA + 1, a migration from the previous
schema, and a frozen record of the new one in tests/unit_tests/models/fixtures/: the record test
(test_hetero_ckpt_policy) fails until all three exist.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Dict

from examples.mimo.training.hetero.errors import CheckpointError

SCHEMA = 7
KEY = "checkpoint_version"  # the name schema 2 used for its version; kept so every schema reads it


def make(cfg) -> dict:
    return {KEY: SCHEMA, "config": dataclasses.asdict(cfg)}


def _from_2(common: dict) -> dict:
    """Schema 2 stored the configuration as "args" and the provider's must-match fields beside it
    (now taken from the fields' resume classes). Schema 3 added --context-parallel-size as a
    field and the Nemotron provider's --training-stage (schema 2 kept only its effect, both
    freeze flags: projector-only is that state)."""
    out = {k: v for k, v in common.items() if k not in ("args", "model_must_match")}
    config = copy.deepcopy(common["args"])
    config["grid"]["context_parallel_size"] = 1
    if config["model_provider"] == "nemotron_moe_vlm":
        m = config["model"]
        m["training_stage"] = "projector-only" if m["freeze_lm"] and m["freeze_vit"] else "full"
    out.update({KEY: 3, "config": config})
    return out


def _from_3(common: dict) -> dict:
    """Schema 4 added --load-from-hf, and to the Nemotron provider the router's scaling factor
    (schema 3's code used 2.5), --moe-router-bias-update-rate (megatron-core's default then) and
    vision_layout: schema 3's vision side had RADIO's final LayerNorm and no projector norm
    ("ln_post"), which today's model is not: such a checkpoint is refused, naming the field."""
    config = copy.deepcopy(common["config"])
    config["ckpt"]["load_from_hf"] = None
    if config["model_provider"] == "nemotron_moe_vlm":
        config["model"].update(vision_layout="ln_post", moe_router_bias_update_rate=1e-3)
        config["model"]["arch"]["moe_router_topk_scaling_factor"] = 2.5
    return {**common, KEY: 4, "config": config}


def _field_added(field: str, value, **more) -> Callable[[dict], dict]:
    """The migration of a schema that only added config fields (dotted names) with values, what
    the older code did without them (``more``: further fields, dots as ``__``)."""
    added = {field: value, **{k.replace("__", "."): v for k, v in more.items()}}

    def migrate(common: dict) -> dict:
        config = copy.deepcopy(common["config"])
        for dotted, v in added.items():
            *parents, name = dotted.split(".")
            node = config
            for key in parents:
                node = node[key]
            node[name] = v
        return {**common, KEY: common[KEY] + 1, "config": config}

    return migrate


MIGRATIONS: Dict[int, Callable[[dict], dict]] = {
    2: _from_2, 3: _from_3,
    4: _field_added("runtime.verbose_warnings", False),  # schema 5: --verbose-warnings
    5: _field_added("runtime.kernel_cache_dir", None),  # schema 6: --kernel-cache-dir
    # schema 7: --use-cpu-initialization (until then every run drew its weights on the CPU) and
    # --skip-memory-check (nothing was checked)
    6: _field_added("kernels.use_cpu_initialization", True, runtime__skip_memory_check=True),
}


def read(common: dict, path: str) -> dict:
    """``common`` (a checkpoint's common state) at today's schema; ``path`` for the message."""
    version = common.get(KEY)
    if version == SCHEMA:
        return common
    if version not in MIGRATIONS:
        known = sorted(MIGRATIONS) + [SCHEMA]
        raise CheckpointError(f"{path}: checkpoint schema {version!r} is not one this trainer "
                              f"reads ({', '.join(map(str, known))})")
    while common[KEY] != SCHEMA:
        common = MIGRATIONS[common[KEY]](common)
    return common


def is_ours(common: dict) -> bool:
    """Whether a dist-checkpoint's common state is this trainer's (of any schema it reads)."""
    return common.get(KEY) == SCHEMA or common.get(KEY) in MIGRATIONS
