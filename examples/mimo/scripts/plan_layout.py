"""Lists the layouts N nodes of G GPUs allow for a model and global batch, ranked by the cost
model of examples/mimo/cluster/planner.py; every layout printed is accepted by the trainer.

    python examples/mimo/scripts/plan_layout.py --nodes 9 --gpus-per-node 8 \
        --global-batch-size 256 --seq-length 4096 [--profile bench.json] [--top 10] \
        -- --model-provider nemotron_moe_vlm --model-preset nemotron-54l

Model (and any other trainer) flags go after ``--``. --profile: the file of
``bench_hetero.py --profile-out`` (measured per-branch rates); without it both branches compute
at --achieved-tflops. Layouts whose estimated memory exceeds --gpu-memory-gib are left out.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--images-per-sample", type=float, default=1.0)
    p.add_argument("--profile", default=None, help="bench_hetero.py --profile-out file")
    p.add_argument("--achieved-tflops", type=float, default=100.0,
                   help="model TFLOP/s per GPU without a profile (H100, Nemotron-20l, TE: ~115)")
    p.add_argument("--gpu-memory-gib", type=float, default=None)
    p.add_argument("--intra-node-gbps", type=float, default=None,
                   help="GB/s per GPU within a node (default 200, or the profile's measured one)")
    p.add_argument("--inter-node-gbps", type=float, default=None, help="across nodes (default 40)")
    p.add_argument("--top", type=int, default=10)
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    a, flags = p.parse_args(argv[:split]), argv[split + 1:]
    if a.nodes < 1 or a.gpus_per_node < 1:
        p.error(f"--nodes {a.nodes} and --gpus-per-node {a.gpus_per_node} must be >= 1")
    from examples.mimo.cluster.planner import plan

    try:
        ranked, refused, rates = plan(
            flags, nodes=a.nodes, gpus_per_node=a.gpus_per_node, global_batch=a.global_batch_size,
            seq_length=a.seq_length, images_per_sample=a.images_per_sample,
            achieved_tflops=a.achieved_tflops, profile=a.profile, memory_gib=a.gpu_memory_gib,
            network={k: v for k, v in (("intra_node_gbps", a.intra_node_gbps),
                                       ("inter_node_gbps", a.inter_node_gbps)) if v is not None})
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not ranked:
        why = refused[0] if refused else (f"every layout needs more than --gpu-memory-gib "
                                          f"{a.gpu_memory_gib}")
        print(f"error: no layout of {a.nodes} x {a.gpus_per_node} GPUs is accepted: {why}",
              file=sys.stderr)
        return 2
    source = f"profile {a.profile}" if a.profile else "--achieved-tflops"
    print(f"{len(ranked)} layouts; compute at encoder {rates['encoder']:.3g} / LLM "
          f"{rates['llm']:.3g} TFLOP/s per GPU ({source})")
    print("| # | layout | enc GPUs | enc TP/DP | LLM TP/PP/DP/EP | micro | lanes/enc rank "
          "| enc ms/mb | LLM ms/mb | sync ms | ms/iter | GiB/GPU |")
    print("| " + " | ".join(["---"] * 12) + " |")
    for i, e in enumerate(ranked[:a.top], 1):
        L, g = e.layout, e.layout.grid
        print(f"| {i} | {'colocated' if g.colocated else 'hetero'} | {L.encoder_gpus} "
              f"| {g.encoder_tp}/{g.encoder_dp} | {g.llm_tp}/{g.llm_pp}/{g.llm_dp}/{g.llm_ep} "
              f"| {L.micro_batch} | {L.lanes_per_encoder_rank:g} | {e.encoder_ms:.2f} "
              f"| {e.llm_ms:.2f} | {e.sync_ms:.2f} | {e.iteration_ms:.1f} | {e.memory_gib:.1f} |")
    print("flags of each, in order:")
    for i, e in enumerate(ranked[:a.top], 1):
        print(f"{i}: {' '.join(e.layout.flags())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
