"""The contracts between the training loop and its providers: exactly what the loop may call.

A model provider owns its flags, its frozen config and how it builds this rank's part of the
MimoModel; a data provider owns its flags and turns sample indices into samples. Both are resolved
once at start-up (``Runtime.model_provider`` / ``Runtime.data_provider``); nothing else looks them
up by name. The registries (``MODEL_PROVIDERS``, ``DATA_PROVIDERS``) hold modules that satisfy these
protocols, and a test checks each one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import torch

# The modality key of the vision branch, shared by providers, data and the topology.
ENCODER_MODULE = "images"
LANGUAGE_MODULE = "language"  # megatron-core's MIMO_LANGUAGE_MODULE_KEY


@dataclass(frozen=True)
class ModelFacts:
    """What validation and the loop need to know about a model, before anything is built."""

    llm_num_layers: int
    llm_num_heads: int
    llm_num_query_groups: int
    encoder_num_heads: int
    num_experts: int  # 0 for a dense LLM
    llm_moe_layers: int  # layers whose MLP is a MoE; 0 for a dense LLM
    moe_activation: str = ""  # the routed experts' activation, e.g. "squared_relu" ("": no MoE)
    moe_aux_losses: Tuple[str, ...] = ()  # names megatron's MoE metrics tracker records them by
    # Expert capacity (None: dropless). Padded to it, the experts' shapes are fixed: what a CUDA
    # graph of a whole MoE layer needs (graphs.py).
    moe_capacity_factor: Optional[float] = None
    moe_pad_to_capacity: bool = False
    uses_mamba: bool = False  # needs mamba-ssm's Triton kernels (see compat.import_mamba_triton_kernels)
    encoder_params: int = 0  # parameters of the encoder branch (ViT + projector), all ranks together
    llm_params: int = 0  # parameters of the language model, all ranks together
    # For the layout planner's cost and memory model (cluster/planner.py):
    llm_expert_params: int = 0  # of llm_params, those in routed experts (sharded by EP)
    llm_hidden_size: int = 0
    encoder_hidden_size: int = 0
    encoder_num_layers: int = 0
    encoder_tokens_per_image: int = 0  # the ViT's sequence length per image
    transformer_impl: str = "local"  # "transformer_engine" when the layers are TE's (kernels.py)
    sequence_parallel: bool = False  # the language model can split its sequence over TP
    # For the memory estimate (training/hetero/memory.py); None: every parameter trains.
    llm_trainable_params: Optional[int] = None
    encoder_trainable_params: Optional[int] = None
    llm_vocab_size: int = 0
    # What backward keeps of one token (LLM) or one image (encoder) in bytes, whole branch, no
    # TP, 16-bit activations, no recompute: what the provider's layers save for their backward.
    llm_activation_bytes_per_token: float = 0.0
    llm_expert_activation_bytes_per_token: float = 0.0  # of it, the routed experts' (capacity)
    encoder_activation_bytes_per_image: float = 0.0
    # attention layers x heads whose [s, s] scores backward keeps at 16-bit (megatron-core's
    # unfused local attention; 0 where TE's fused kernels keep none)
    llm_attention_score_heads: int = 0


@dataclass(frozen=True)
class RankData:
    """Which part of every global batch one rank reads (see data/lanes.py)."""

    is_llm: bool
    dp_rank: int  # in this rank's own branch
    llm_dp: int
    encoder_dp: int
    micro_batch_size: int
    num_microbatches: int
    seq_length: int
    seed: int
    with_images: bool  # False when the run has no encoder (--llm-only)


@dataclass(frozen=True)
class DataSpec:
    """What a data provider needs to know about a model to produce its samples."""

    vocab_size: int
    image_token_id: int
    image_tokens: int  # placeholder tokens per image
    image_shape: Tuple[int, int, int]  # C, H, W
    # how images are normalised after resizing to image_shape: (pixel - mean) / std per channel
    pixel_mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Dynamic resolution: each image keeps its aspect ratio, scaled down to at most image_shape's
    # area and max_image_side per side, in multiples of 2 x patch_dim (2x2 patches make one
    # token); the encoder takes its patches packed ([patches, C p^2]) with imgs_sizes.
    dynamic_resolution: bool = False
    patch_dim: int = 0
    max_image_side: int = 0


@dataclass(frozen=True)
class StepWork:
    """One iteration's work, the whole job together, for counting model FLOPs."""

    sequences: int  # LLM rows of seq_length tokens (the global batch)
    seq_length: int
    images: float  # images through the encoder (0 without one)


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one iteration, forward and backward, per branch (model_providers/flops.py)."""

    encoder: float  # ViT + projector
    llm: float


@dataclass(frozen=True)
class HFPart:
    """Where a branch's weights come from in a Hugging Face folder (model_providers/
    hf_checkpoint.py): ``recipes`` map each of the branch's dist-checkpointing keys to the HF
    tensors it is made of; ``unused(name)``: a tensor of the folder deliberately not imported."""

    folder: str
    recipes: dict
    unused: Callable[[str], bool]
    notes: Tuple[str, ...] = ()  # logged once at the load (e.g. a branch left out)


class KernelChoices(Protocol):
    """The trainer's kernel options (training/hetero/kernels.KernelConfig) as a provider reads
    them when it builds a branch."""

    @property
    def use_mamba_mem_eff_path(self) -> bool:
        """Mamba's fused path: not disabled, and causal-conv1d's CUDA extension is there."""

    def init_fields(self) -> dict:
        """TransformerConfig fields every config of the model takes (where weights are drawn)."""

    def transformer_fields(self, *, fp8: bool, graphs: bool = False) -> dict:
        """TransformerConfig fields of one branch (FP8, recompute, fusions, CUDA graphs), and
        ``init_fields``."""


@runtime_checkable
class ModelProvider(Protocol):
    NAME: str
    VIT_ENCODER: str  # the encoder's name inside the vision submodule (its input key)

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        """The flags of its config, declared on the config's fields (flags.option/derived, each
        with its resume class: a field the weights depend on is MATCH) and added by
        flags.add_group."""

    def config_from_args(self, args: argparse.Namespace) -> object:
        """The provider's frozen config; raises ValueError naming the flag on bad values."""

    def facts(self, cfg) -> ModelFacts: ...

    def data_spec(self, cfg) -> DataSpec: ...

    def build(self, cfg, *, topology, dtype: torch.dtype, seq_length: int,
              device: torch.device, kernels) -> torch.nn.Module:
        """This rank's part of the MimoModel, unwrapped, with frozen parts frozen; ``kernels``
        (KernelChoices) says which TransformerConfig fields each branch takes."""

    def flops(self, cfg, work: StepWork) -> StepFlops:
        """Model FLOPs of an iteration; frozen parts count no weight gradients."""

    def module_config(self, module: torch.nn.Module) -> object:
        """The TransformerConfig that DDP uses for a built branch."""

    def hf_parts(self, cfg, *, load_from_hf: Optional[str], language_from: Optional[str],
                 vision_from: Optional[str]) -> Dict[str, HFPart]:
        """{branch (LANGUAGE_MODULE, ENCODER_MODULE): its HF source} for the given flags' HF
        folders ({} when none is one); config_from_args takes the shapes from the same folders
        and refuses what the provider cannot import."""

    def hf_export(self, record: dict, *, llm_only: bool) -> Tuple[Dict[str, dict], dict]:
        """({branch: recipes}, config.json) of the HF folder a checkpoint exports to, from the
        provider config its run record stores; ValueError when there is none."""


@runtime_checkable
class DataProvider(Protocol):
    NAME: str

    def add_args(self, parser: argparse.ArgumentParser) -> None: ...

    def config_from_args(self, args: argparse.Namespace) -> object: ...

    def validate(self, cfg, spec: DataSpec, seq_length: int, *, equal_images: str,
                 llm_only: bool) -> None:
        """Raises ValueError naming the flag when the data cannot feed this model and layout.
        ``equal_images``: '' or why the layout needs the same image tokens on every encoder rank
        (megatron-core splits or joins the encoder's output by token count: fan-in, and a
        colocated layout whose DP sizes differ). Runs before any process group exists."""

    def packs_sequences(self, cfg) -> bool:
        """Whether micro-batches carry several samples per row (packed_seq_params)."""

    def notes(self, cfg, *, llm_dp: int) -> List[str]:
        """Lines rank 0 logs at start-up (and --dry-run shows): what the settings do to the
        data, e.g. how far a pass over the split is from reading every sample once."""

    def build_iterator(self, cfg, *, spec: DataSpec, rank: RankData,
                       to_model: Callable[[dict], dict], split: str = "train") -> "DataIterator":
        """This rank's micro-batches in schedule order. Each is a dict {input_ids, labels,
        loss_mask, images ([n, C, H, W], or at dynamic resolution packed patches [patches,
        C p^2] with imgs_sizes [n, 2]; None without images), optional position_ids and
        packing_kwargs (packed rows: data/task_encoder.packed_sequence_kwargs)}
        passed through ``to_model`` (which makes this role's MimoModel.forward kwargs).
        ``split="val"``: the validation split, endless (pass after pass), not checkpointed."""


class DataStateMismatch(ValueError):
    """A saved per-rank data state that this run's loader settings cannot restore."""


@runtime_checkable
class DataIterator(Protocol):
    """A rank's data stream; run state under the checkpoint's "data" key."""

    # False: the state is layout-free and the same on every rank (saved once, restored on any
    # layout). True: each rank saves its own; it is restored only on the layout that wrote it,
    # and on another layout ``restart`` applies the provider's documented policy.
    per_rank: bool

    def __next__(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def restart(self, *, iteration: int) -> str:
        """Policy for a resume whose saved data state does not fit this layout; returns the
        line the trainer prints."""
