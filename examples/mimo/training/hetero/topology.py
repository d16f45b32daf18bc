"""The distributed state of a hetero run: two disjoint HyperCommGrids, every process group
megatron-core needs on each, the encoder->LLM bridge, and their teardown.

Group creation is a collective over the whole world, so every rank creates every group of both
grids in one fixed order and keeps only the handles of its own module.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.models.mimo.config.role import MIMO_LANGUAGE_MODULE_KEY
from megatron.core.pipeline_parallel.bridge_communicator import BridgeCommunicator
from megatron.core.pipeline_parallel.multimodule_communicator import MultiModulePipelineCommunicator
from megatron.core.process_groups_config import (
    MultiModuleProcessGroupCollection,
    ProcessGroupCollection,
)

from examples.mimo.interfaces import ENCODER_MODULE
from examples.mimo.training.hetero.config import GridConfig

LANGUAGE = MIMO_LANGUAGE_MODULE_KEY
BASE_DIMS = ["tp", "cp", "dp", "pp"]  # tp fastest, pp slowest: Megatron's tp-cp-dp-pp order
EXPERT_VIEW = "expert"  # name megatron-core's MimoOptimizer looks up
EXPERT_DIMS = ["expt_tp", "ep", "expt_dp", "pp"]

# (ProcessGroupCollection field, grid dims, view)
_GRID_GROUPS = (
    ("tp", "tp", None),
    ("cp", "cp", None),
    ("dp", "dp", None),
    ("pp", "pp", None),
    ("dp_cp", ["dp", "cp"], None),
    ("tp_cp", ["tp", "cp"], None),
    ("mp", ["tp", "pp"], None),
    ("tp_dp", ["tp", "dp"], None),
    ("tp_dp_cp", ["tp", "cp", "dp"], None),
    ("intra_dist_opt", ["tp", "cp", "dp", "pp"], None),
    ("ep", "ep", EXPERT_VIEW),
    ("expt_tp", "expt_tp", EXPERT_VIEW),
    ("tp_ep", ["expt_tp", "ep"], EXPERT_VIEW),
    ("tp_ep_pp", ["expt_tp", "ep", "pp"], EXPERT_VIEW),
    ("expt_dp", "expt_dp", EXPERT_VIEW),
)
REQUIRED_GROUPS = tuple(name for name, _, _ in _GRID_GROUPS) + ("intra_dp_cp", "intra_expt_dp")


class Topology:
    """Owns grids, per-module process-group collections and the pipeline bridge."""

    def __init__(self, grid: GridConfig, *, timeout: timedelta, pipeline_dtype: torch.dtype):
        if dist.get_world_size() != grid.world_size:
            raise ValueError(f"world size {dist.get_world_size()} != grid ranks {grid.world_size}")
        self.grid_config = grid
        self.rank = dist.get_rank()
        self.grid_map: Dict[str, HyperCommGrid] = {}
        self._grids: List[HyperCommGrid] = []  # every grid created, also one that failed half way
        self._pgcs: Dict[str, ProcessGroupCollection] = {}
        self._extra_groups: List[dist.ProcessGroup] = []
        self.communicator: Optional[MultiModulePipelineCommunicator] = None
        try:
            self._build(timeout, pipeline_dtype)
        except BaseException:
            self.destroy()
            raise

    def _build(self, timeout: timedelta, pipeline_dtype: torch.dtype) -> None:
        g = self.grid_config
        if not g.llm_only:
            self.grid_map[ENCODER_MODULE] = self._make_grid(
                offset=0, tp=g.encoder_tp, pp=1, dp=g.encoder_dp, ep=1, expt_tp=g.encoder_tp,
                expt_dp=g.encoder_dp, timeout=timeout)
        self.grid_map[LANGUAGE] = self._make_grid(
            offset=g.llm_offset, tp=g.llm_tp, pp=g.llm_pp, dp=g.llm_dp, ep=g.llm_ep,
            expt_tp=g.llm_expt_tp, expt_dp=g.llm_expt_dp, timeout=timeout)
        embd, pos_embd = self._embedding_groups(self.grid_map[LANGUAGE], timeout)

        for name, grid in self.grid_map.items():
            if not grid.is_current_rank_in_grid():
                continue
            pgc = ProcessGroupCollection()
            for field, dims, view in _GRID_GROUPS:
                setattr(pgc, field, grid.get_pg(dims, view=view))
            # One distributed-optimizer instance: the "intra" groups are the full ones.
            pgc.intra_dp_cp, pgc.intra_expt_dp = pgc.dp_cp, pgc.expt_dp
            # Only the LLM has word embeddings to tie across its first and last stages.
            pgc.embd, pgc.pos_embd = (embd, pos_embd) if name == LANGUAGE else (None, None)
            missing = [f for f in REQUIRED_GROUPS if getattr(pgc, f) is None]
            if missing:
                raise RuntimeError(f"rank {self.rank}: {name} process groups missing: {missing}")
            self._pgcs[name] = pgc

        # Colocated (and LLM-only) runs are one pipeline stage holding the whole MimoModel, which
        # its COLOCATED forward runs end to end; the schedule sees only the LLM's groups.
        single = g.llm_only or g.colocated
        topology = {LANGUAGE: []} if single else {ENCODER_MODULE: [LANGUAGE], LANGUAGE: []}
        stages = {LANGUAGE: self.grid_map[LANGUAGE]} if single else self.grid_map
        self.communicator = MultiModulePipelineCommunicator(
            stages, topology,
            ModelParallelConfig(pipeline_dtype=pipeline_dtype, variable_seq_lengths=True),
            dim_mapping={"s": 0, "b": 1, "h": 2},
            module_output_ndim={ENCODER_MODULE: 2},  # the encoder emits [tokens, hidden]
        )
        self.schedule_pgc = MultiModuleProcessGroupCollection(
            module_pgs={n: p for n, p in self._pgcs.items() if not single or n == LANGUAGE},
            language_model_module_name=LANGUAGE if LANGUAGE in self._pgcs else None)

    def _make_grid(self, *, offset, tp, pp, dp, ep, expt_tp, expt_dp, timeout) -> HyperCommGrid:
        grid = HyperCommGrid([tp, 1, dp, pp], BASE_DIMS, rank_offset=offset)
        grid.register_view(EXPERT_VIEW, [expt_tp, ep, expt_dp, pp], EXPERT_DIMS, shared_dims=["pp"])
        self._grids.append(grid)
        for _, dims, view in _GRID_GROUPS:
            grid.create_pg(dims, view=view, timeout=timeout)
        return grid

    def _embedding_groups(self, grid: HyperCommGrid, timeout: timedelta):
        """Word-embedding group = first and last stage of each LLM pipeline; position = first."""
        pipelines = grid.get_rank_enum("pp")
        embd_ranks = [sorted({p[0], p[-1]}) for p in pipelines]
        embd, _ = dist.new_subgroups_by_enumeration(embd_ranks, timeout=timeout)
        pos_embd, _ = dist.new_subgroups_by_enumeration([[p[0]] for p in pipelines], timeout=timeout)
        self._extra_groups += [pg for pg in (embd, pos_embd) if pg is not None]
        return embd, pos_embd

    @property
    def llm_only(self) -> bool:
        return self.grid_config.llm_only

    def module_pgc(self, name: str) -> Optional[ProcessGroupCollection]:
        """This rank's groups for module ``name``, or None if the rank is not in that module."""
        return self._pgcs.get(name)

    @property
    def module_name(self) -> str:
        """The module whose pipeline stage this rank is: its only one on disjoint grids, the LLM
        when colocated (the stage that runs the whole model)."""
        return LANGUAGE if self.grid_config.colocated else next(iter(self._pgcs))

    def destroy(self) -> None:
        BridgeCommunicator.destroy_broadcast_pgs()
        BridgeCommunicator.destroy_bridge_pgs()
        for grid in self._grids:
            grid.destroy()
        for pg in self._extra_groups:
            dist.destroy_process_group(pg)
        self._grids.clear()
        self.grid_map.clear()
        self._pgcs.clear()
        self._extra_groups.clear()
        self.communicator = None
