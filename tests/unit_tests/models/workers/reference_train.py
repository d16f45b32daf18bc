"""Single-process reference: the same provider-built encoder and LLM, trained with plain PyTorch
in one process (no MimoModel, no bridge, no DDP, no distributed optimizer): encode the step's
images, write them over the placeholder embeddings, sum per-token losses over the whole global
batch, divide by its token count, clip by the global norm, torch AdamW, the same LR schedule.

    reference_train.py <world size of the hetero run> <metrics file> <train_hetero flags...>
"""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core.transformer.spec_utils import build_module

from examples.mimo.data import DATA_PROVIDERS
from examples.mimo.model_providers import MODEL_PROVIDERS
from examples.mimo.model_providers.mock import VIT_ENCODER, encoder_spec, language_spec
from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.config import GridConfig, parse_config
from examples.mimo.training.hetero.device import init_distributed
from examples.mimo.training.hetero.optim import build_scheduler
from examples.mimo.training.hetero.topology import LANGUAGE, Topology


def param_groups(modules, weight_decay):
    # Megatron's default: no weight decay for biases and 1-D parameters.
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


def main(world_size: int, metrics_path: str, argv):
    cfg = parse_config(argv, world_size=world_size)
    init_distributed("cpu", 1)
    compat.apply_startup(backend="gloo", timeout=timedelta(minutes=1), mamba=False)  # as the trainer
    single = GridConfig(encoder_tp=1, encoder_dp=1, llm_tp=1, llm_pp=1, llm_dp=1, llm_ep=1,
                        llm_expt_tp=1, llm_only=True)
    topo = Topology(single, timeout=timedelta(minutes=1), pipeline_dtype=torch.float32)
    pgc = topo.module_pgc(LANGUAGE)
    seed, f32 = cfg.runtime.seed, torch.float32

    torch.manual_seed(seed)
    vision_spec = encoder_spec(cfg.model, pg_collection=pgc, tp=1, dtype=f32)
    vision = vision_spec.module.from_spec(vision_spec)  # as MimoModel builds its submodules
    torch.manual_seed(seed)
    lm = build_module(language_spec(cfg.model, pg_collection=pgc, tp=1, pp=1, dtype=f32,
                                    seq_length=cfg.batch.seq_length))
    spec = MODEL_PROVIDERS[cfg.model_provider].data_spec(cfg.model)
    make = DATA_PROVIDERS[cfg.data_provider].make_sample
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups([vision, lm], cfg.schedule.weight_decay), lr=cfg.schedule.lr,
                            betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    sched = build_scheduler(opt, cfg)
    params = [p for g in opt.param_groups for p in g["params"]]
    G = cfg.batch.global_batch_size

    with open(metrics_path, "w") as out:
        for step in range(cfg.schedule.train_iters):
            samples = [make(i, cfg=cfg.data, spec=spec, seq_length=cfg.batch.seq_length, seed=seed,
                            with_images=True) for i in range(step * G, (step + 1) * G)]
            ids = torch.stack([s["input_ids"] for s in samples])
            labels = torch.stack([s["labels"] for s in samples])
            mask = torch.stack([s["loss_mask"] for s in samples])
            positions = torch.arange(ids.size(1)).expand_as(ids)
            embeddings = lm.embedding(input_ids=ids, position_ids=positions).transpose(0, 1).clone()
            images = [s["image"] for s in samples if s["image"] is not None]
            if images:
                image_emb = vision(encoder_inputs={VIT_ENCODER: {"images": torch.stack(images)}})
                embeddings[ids == spec.image_token_id] = image_emb
            per_token = lm(input_ids=None, position_ids=positions,
                           decoder_input=embeddings.transpose(0, 1), labels=labels,
                           attention_mask=None)
            loss_sum = (per_token * mask).sum()
            tokens = mask.sum()
            opt.zero_grad(set_to_none=True)
            (loss_sum / tokens).backward()
            norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
            coeff = o.clip_grad / (norm.item() + 1e-6)
            if o.clip_grad > 0 and coeff < 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coeff)
            lr = sched.get_lr({})
            opt.step()
            sched.step(increment=G)
            out.write(json.dumps({"iteration": step + 1, "lm_loss": (loss_sum / tokens).item(),
                                  "grad_norm": norm.item(), "learning_rate": lr,
                                  "loss_tokens": int(tokens.item())}) + "\n")
    topo.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
