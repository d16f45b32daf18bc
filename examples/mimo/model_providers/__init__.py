"""Model-provider registry: modules satisfying ``examples.mimo.interfaces.ModelProvider``."""

from typing import Dict

from examples.mimo.interfaces import ModelProvider
from examples.mimo.model_providers import llava, mock, nemotron_moe_vlm

MODEL_PROVIDERS: Dict[str, ModelProvider] = {p.NAME: p for p in (mock, nemotron_moe_vlm, llava)}
