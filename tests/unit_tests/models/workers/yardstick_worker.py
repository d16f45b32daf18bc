"""megatron.training's reading of the yardstick's flags against our provider's TransformerConfig.

Prints one JSON line: {field: [ours, megatron's]} for every compared field. megatron.training
needs Python 3.12 for ``typing.override`` only (a decorator); on 3.11 a no-op stands in, in this
process alone. Args: train_hetero flags (LLM-only, one rank).
"""

import dataclasses
import json
import os
import sys
import typing

import torch

typing.override = getattr(typing, "override", lambda f: f)

from examples.mimo.model_providers import nemotron_moe_vlm, specs  # noqa: E402
from examples.mimo.scripts.megatron_yardstick import megatron_flags  # noqa: E402
from examples.mimo.training.hetero.config import parse_config  # noqa: E402

FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
          "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups",
          "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
          "moe_router_topk", "moe_router_score_function", "moe_router_topk_scaling_factor",
          "moe_router_enable_expert_bias", "moe_router_dtype", "moe_router_load_balancing_type",
          "moe_aux_loss_coeff", "moe_token_dispatcher_type", "moe_grouped_gemm",
          "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity", "moe_token_drop_policy",
          "normalization", "add_bias_linear", "gated_linear_unit", "init_method_std",
          "hidden_dropout", "attention_dropout", "calculate_per_token_loss", "bf16", "params_dtype",
          "recompute_granularity", "recompute_method", "recompute_num_layers", "fp8",
          "moe_router_fusion", "moe_permute_fusion", "cross_entropy_loss_fusion",
          "use_mamba_mem_eff_path", "bias_dropout_fusion", "use_transformer_engine_op_fuser",
          "use_fused_weighted_squared_relu")


def main(argv):
    # configs only, no layers: TE-only fields are compared where TE and the GPU are not (the CPU);
    # megatron's parser asks the GPU's capability for --moe-grouped-gemm: that of an H100/H200
    specs.check_transformer_impl = lambda impl: None
    torch.cuda.get_device_capability = lambda *_: (9, 0)
    cfg = parse_config(["--llm-only", "--llm-dp", "1", *argv], world_size=1)
    dtype = torch.bfloat16 if cfg.runtime.bf16 else torch.float32
    ours = nemotron_moe_vlm.language_config(cfg.model, tp=1, pp=1, ep=1, expt_tp=1, dtype=dtype,
                                            kernels=cfg.kernels)
    sys.argv = ["yardstick", *megatron_flags(cfg, train_iters=cfg.schedule.train_iters)]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron.training.argument_utils import hybrid_config_from_args
    from megatron.training.arguments import parse_and_validate_args

    model = hybrid_config_from_args(parse_and_validate_args())
    theirs = model.transformer
    out = {f: [str(getattr(ours, f)), str(getattr(theirs, f))] for f in FIELDS}
    # megatron.training leaves the flag's default, None, which means False
    out["use_cpu_initialization"] = [ours.use_cpu_initialization, bool(theirs.use_cpu_initialization)]
    out["activation_func"] = [ours.activation_func.__name__, theirs.activation_func.__name__]
    out["vocab_size"] = [cfg.model.arch.vocab_size, model.vocab_size]
    out["hybrid_layer_pattern"] = [cfg.model.arch.hybrid_layer_pattern, model.hybrid_layer_pattern]
    out["position_embedding_type"] = ["none", model.position_embedding_type]
    out["share_embeddings_and_output_weights"] = [False, model.share_embeddings_and_output_weights]
    out["seq_length"] = [cfg.batch.seq_length, model.seq_length]
    assert dataclasses.is_dataclass(theirs)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
