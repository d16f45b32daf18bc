"""Model-provider registry. A provider owns its flags, its frozen config and how it builds the MimoModel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

# The modality key of the vision branch, shared by providers and data.
ENCODER_MODULE = "images"


@dataclass(frozen=True)
class ModelFacts:
    """What grid validation needs to know about a model, before anything is built."""

    llm_num_layers: int
    llm_num_heads: int
    llm_num_query_groups: int
    encoder_num_heads: int
    num_experts: int  # 0 for a dense LLM
    llm_moe_layers: int  # layers whose MLP is a MoE; 0 for a dense LLM
    moe_aux_losses: Tuple[str, ...] = ()  # names megatron's MoE metrics tracker records them by


@dataclass(frozen=True)
class DataSpec:
    """What a data provider needs to know about a model to produce its samples."""

    vocab_size: int
    image_token_id: int
    image_tokens: int  # placeholder tokens per image
    image_shape: Tuple[int, int, int]  # C, H, W


from examples.mimo.model_providers import mock, nemotron_moe_vlm  # noqa: E402

MODEL_PROVIDERS: Dict[str, object] = {p.NAME: p for p in (mock, nemotron_moe_vlm)}
