"""Probes each megatron-core workaround in compat.py, under torchrun with one CPU rank.

    compat_worker.py <out.json> <work dir>

For each workaround it records {"symptom": the upstream problem still shows without the
workaround (the canary), "fixed": with the workaround it does not}. The upstream behaviour is
probed first, before compat patches anything process-wide.
"""

import contextlib
import copy
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
import types
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling

from examples.mimo.model_providers import layers
from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.config import parse_config
from examples.mimo.training.hetero.device import init_distributed

RESULTS = {}
DP_RESHARDABLE = {"distrib_optim_sharding_type": "dp_reshardable"}


def probe(name):
    def wrap(fn):
        try:
            RESULTS[name] = fn()
        except BaseException:  # a probe that breaks reports how, and the test shows it
            RESULTS[name] = {"error": traceback.format_exc()[-3000:]}
        return fn
    return wrap


def raises(fn, kind=BaseException) -> bool:
    try:
        fn()
    except kind:
        return True
    return False


@contextlib.contextmanager
def spy(module, name, record):
    real = getattr(module, name)

    def call(*args, **kwargs):
        record.append((args, kwargs))
        return real(*args, **kwargs)

    setattr(module, name, call)
    try:
        yield
    finally:
        setattr(module, name, real)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def main(out_path: str, work: str):
    init_distributed("cpu", 1)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.bridge_communicator import BridgeCommunicator

    # ---- upstream first, nothing patched yet ------------------------------------------------
    @probe("global_memory_buffer")
    def _():
        symptom = raises(parallel_state.get_global_memory_buffer, AssertionError)
        compat.global_memory_buffer()
        return {"symptom": symptom, "fixed": parallel_state.get_global_memory_buffer() is not None}

    @probe("bridge_groups")
    def _():
        created = []
        upstream = BridgeCommunicator._get_or_create_bridge_pg
        with spy(dist, "new_group", created):
            try:
                upstream([0])
            except Exception:  # no NCCL on this machine: the call itself is what we look at
                pass
        BridgeCommunicator.destroy_bridge_pgs()
        symptom = created[-1][1].get("backend") == "nccl" and created[-1][1].get("timeout") is None
        created.clear()
        timeout = timedelta(seconds=42)
        compat.bridge_groups(backend="gloo", timeout=timeout)
        with spy(dist, "new_group", created):
            pg = BridgeCommunicator._get_or_create_bridge_pg([0])
        fixed = (dist.get_backend(pg) == "gloo" and created[-1][1]["timeout"] == timeout)
        BridgeCommunicator.destroy_bridge_pgs()
        return {"symptom": symptom, "fixed": fixed}

    @probe("colocated_bridge_groups")
    def _():
        from megatron.core.models.mimo.comm import colocated_communicator as cc

        class Probe(cc.ColocatedBridgeCommunicator):
            """Fan-in by 2 on one rank: only the gather group's creation runs."""

            def _validate_grids(self):
                pass

            def _extract_parallelism_info(self):
                self.src_dp_size, self.dest_dp_size, self.src_tp_size, self.dest_tp_size = 2, 1, 1, 1

            def _build_rank_mappings(self):
                self.rank_to_src_pos = {}

            def _build_gather_groups(self, **kwargs):
                return [[0]]

        created = []
        with spy(dist, "new_subgroups_by_enumeration", created):
            try:
                Probe(None, None)
            except Exception:  # no NCCL on this machine: the call itself is what we look at
                pass
        symptom = created[-1][1].get("backend") == "nccl" and created[-1][1].get("timeout") is None
        created.clear()
        timeout = timedelta(seconds=43)
        compat.colocated_bridge_groups(backend="gloo", timeout=timeout)
        with spy(dist, "new_subgroups_by_enumeration", created):
            bridge = Probe(None, None)
        fixed = dist.get_backend(bridge.gather_pg) == "gloo" and created[-1][1]["timeout"] == timeout
        bridge.destroy()
        return {"symptom": symptom, "fixed": fixed}

    @probe("refuse_pickled_checkpoint_objects")
    def _():
        # Three places unpickle checkpoint bytes with code execution: a ShardedObject, the
        # common state (both torch's DefaultLoadPlanner.load_bytes) and torch's .metadata.
        def ran(name, load) -> bool:
            marker = os.path.join(work, f"pwned-{name}")
            with contextlib.suppress(BaseException):  # refused, or the payload broke the load
                load(marker)
            found = os.path.exists(marker)
            if found:
                os.remove(marker)
            return found

        def saved(name, state):
            path = os.path.join(work, name)
            if not os.path.isdir(path):
                os.makedirs(path)
                dist_checkpointing.save(state, path)
            return path

        def sharded(marker):
            path = saved("payload", {"rng": ShardedObject("rng", Payload(marker), (1,), (0,),
                                                          replica_id=0)})
            template = {"rng": ShardedObject("rng", None, (1,), (0,), replica_id=0)}
            dist_checkpointing.load(template, path)

        def common(marker):
            dist_checkpointing.load_common_state_dict(saved("common", {"x": Payload(marker)}))

        def metadata(marker):
            path = os.path.join(work, "metadata")
            if not os.path.isdir(path):
                os.makedirs(path)
                dist_checkpointing.save({"x": 1}, path)
            with open(os.path.join(path, ".metadata"), "wb") as f:
                f.write(pickle.dumps(Payload(marker)))
            dist_checkpointing.load_common_state_dict(path)

        places = {"sharded": sharded, "common": common, "metadata": metadata}
        upstream = {name: ran(name, load) for name, load in places.items()}
        compat.refuse_pickled_checkpoint_objects()
        patched = {name: ran(name, load) for name, load in places.items()}
        try:
            sharded(os.path.join(work, "unused"))
            refused = False
        except BaseException as err:  # torch's checkpoint layer wraps it in CheckpointException
            refused = "refusing to unpickle checkpoint object 'rng/shard_0_1'" in str(err)
        return {"symptom": all(upstream.values()), "upstream": upstream, "patched": patched,
                "fixed": refused and not any(patched.values())}

    @probe("param_groups_within")
    def _():
        from megatron.core.optimizer import OptimizerConfig, _get_param_groups

        calls = []
        args = ([torch.nn.Linear(2, 2)], OptimizerConfig(lr=1e-3), None)
        with spy(dist, "all_gather_object", calls):
            _get_param_groups(*args)
            symptom = _gather_group(calls[-1]) is None  # gathers over the WORLD
            group = dist.new_group([0])
            with compat.param_groups_within(group):
                _get_param_groups(*args)
        return {"symptom": symptom, "fixed": _gather_group(calls[-1]) is group}

    @probe("checkpoint_writer_server")
    def _():
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        from examples.mimo.training.hetero.exits import child_pids

        def writer_survives_sigterm(make_queue) -> bool:
            filesystem_async._results_queue = None
            before = set(child_pids(os.getpid()))
            queue = make_queue()
            server = (set(child_pids(os.getpid())) - before).pop()
            os.kill(server, signal.SIGTERM)  # as SLURM signals every process of a step
            time.sleep(1.0)
            try:
                queue.put(1)
                return queue.get(timeout=5) == 1
            except Exception:  # the server is gone: "broken pipe" / EOFError
                return False
            finally:
                filesystem_async._results_queue = None

        def server_outlives_its_rank(start: str) -> bool:
            """A process that starts the server and dies at once, as a killed rank does."""
            code = ("import os, sys\n"
                    "from examples.mimo.training.hetero import compat\n"
                    "from examples.mimo.training.hetero.exits import child_pids\n"
                    "from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
                    f"{start}\n"
                    "print(child_pids(os.getpid())[-1], flush=True)\n"
                    "os._exit(0)\n")
            # The server inherits the pipe: read the line, then wait for the process alone.
            proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", code], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    env=dict(os.environ, PYTHONPATH=os.getcwd()))
            server = int(proc.stdout.readline())
            proc.wait(timeout=60)
            proc.stdout.close()
            time.sleep(2.0)
            try:
                with open(f"/proc/{server}/stat") as f:
                    orphan = f.read().split(")")[1].split()[0] != "Z"
            except OSError:
                return False
            if orphan:
                os.kill(server, signal.SIGKILL)
            return orphan

        upstream_orphan = server_outlives_its_rank("filesystem_async.get_write_results_queue()")
        upstream_signal = writer_survives_sigterm(filesystem_async.get_write_results_queue)
        fixed_orphan = server_outlives_its_rank("compat.checkpoint_writer_server('SIGTERM')")

        def patched():
            compat.checkpoint_writer_server("SIGTERM")
            return filesystem_async._results_queue

        return {"symptom": upstream_orphan and not upstream_signal,
                "fixed": not fixed_orphan and writer_survives_sigterm(patched)}

    @probe("checkpoint_writer_errors")
    def _():
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", "shard.distcp")

        def save(name):
            path = os.path.join(work, name)
            os.makedirs(path)
            state = {"t": ShardedTensor.from_rank_offsets("t", torch.zeros(4), replica_id=0)}
            try:
                dist_checkpointing.save(state, path)
            except BaseException as err:  # torch's CheckpointException
                return str(err)
            return ""

        real = filesystem_async._write_item
        filesystem_async._write_item = full_disk
        try:
            upstream = save("full_upstream")
            with compat.checkpoint_writer_errors() as messages:
                save("full_kept")
        finally:
            filesystem_async._write_item = real
        return {"symptom": "<class 'OSError'>" in upstream and "No space" not in upstream,
                "fixed": any("No space left on device" in m for m in messages)}

    # ---- a real 1-rank training run for the optimizer and checkpoint probes -----------------
    from examples.mimo.training.hetero.loop import train
    from examples.mimo.training.hetero.optim import build_optimizer
    from examples.mimo.training.hetero.runtime import build_runtime

    ckpt = os.path.join(work, "ckpt")
    cfg = parse_config(["--llm-only", "--device", "cpu", "--train-iters", "2", "--seq-length", "32",
                        "--global-batch-size", "4", "--save", ckpt], world_size=1)
    rt = build_runtime(cfg)
    train(rt)
    path = os.path.join(ckpt, "iter_0000002")
    model_sd = rt.model.sharded_state_dict()

    def load_optimizer_state(opt):
        template = {"optimizer": {k: v for k, v in opt.sharded_state_dict(
            model_sd, is_loading=True, metadata=DP_RESHARDABLE).items() if v}}
        return dist_checkpointing.load(template, path, strict=StrictHandling.ASSUME_OK_UNEXPECTED)

    def adam_steps(opt):
        return [inner.optimizer.state[p]["step"] for inner in compat._inner_adams(opt)
                for g in inner.optimizer.param_groups for p in g["params"]]

    @probe("torch_adam_checkpoint_load")
    def _():
        fresh = build_optimizer(rt)
        no_template = raises(lambda: fresh.sharded_state_dict(model_sd, is_loading=True,
                                                               metadata=DP_RESHARDABLE))
        compat._prime_torch_adam_state(fresh)  # the template half only
        with torch.no_grad():
            fresh.load_state_dict(load_optimizer_state(fresh)["optimizer"])
        steps = adam_steps(fresh)
        wrong_steps = len({id(s) for s in steps}) < len(steps) or \
            any(float(s) != 2.0 for s in steps)
        fixed_opt = build_optimizer(rt)
        with compat.torch_adam_checkpoint_load(fixed_opt), torch.no_grad():
            fixed_opt.load_state_dict(load_optimizer_state(fixed_opt)["optimizer"])
        steps = adam_steps(fixed_opt)
        fixed = len({id(s) for s in steps}) == len(steps) and all(float(s) == 2.0 for s in steps)
        return {"symptom": no_template and wrong_steps, "fixed": fixed,
                "no_template": no_template, "wrong_steps": wrong_steps}

    @probe("match_saved_param_groups")
    def _():
        def load_with_saved_lr(match: bool):
            opt = build_optimizer(rt)
            with compat.torch_adam_checkpoint_load(opt), torch.no_grad():
                state = copy.deepcopy(load_optimizer_state(opt)["optimizer"])
                # as if the checkpoint was written by a run with another --lr
                _set_max_lr(state, 0.5)
                if match:
                    compat.match_saved_param_groups(state, lr=cfg.schedule.lr,
                                                    min_lr=cfg.schedule.min_lr)
                opt.load_state_dict(state)

        return {"symptom": raises(lambda: load_with_saved_lr(False), KeyError),
                "fixed": not raises(lambda: load_with_saved_lr(True))}

    @probe("reduce_moe_metrics")
    def _():
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        pgc = rt.topology.module_pgc(rt.topology.module_name)
        name = "seq_load_balancing_loss"
        tracker = get_moe_metrics_tracker()
        tracker.ensure_initialized(name, 4, device="cpu")
        tracker.metrics[name].values += 1.0
        symptom = raises(lambda: tracker.report(loss_scale=1.0, iteration=1, track_names=[name],
                                                num_layers=4, moe_layer_freq=1,
                                                pg_collection=pgc), AssertionError)
        tracker.metrics[name].values.fill_(1.0)
        totals = compat.reduce_moe_metrics(names=[name], num_layers=4, pp=pgc.pp, dp=pgc.dp,
                                           device=torch.device("cpu"))
        return {"symptom": symptom, "fixed": float(totals[name]) == 4.0}

    @probe("local_hybrid_stack")
    def _():
        from megatron.core.models.hybrid.hybrid_block import HybridStack

        from examples.mimo.model_providers import nemotron_moe_vlm as nemotron, specs

        ncfg = parse_config(["--model-provider", "nemotron_moe_vlm", "--train-iters", "1",
                             "--device", "cpu"], world_size=2).model
        config = nemotron.language_config(ncfg, tp=1, pp=1, ep=1, expt_tp=1, dtype=torch.float32)
        submodules = specs.hybrid_stack_spec("local", num_experts=4).submodules
        pgc = rt.topology.module_pgc(rt.topology.module_name)
        kwargs = dict(layer_type_list=list("*E*E"), pg_collection=pgc)
        try:
            HybridStack(config, submodules, **kwargs)
            symptom = False
        except ImportError as err:  # the hard-wired TENorm
            symptom = "Transformer Engine" in str(err)
        stack = layers.local_hybrid_stack()(config, submodules, **kwargs)
        return {"symptom": symptom, "fixed": type(stack.final_norm) is torch.nn.RMSNorm}

    @probe("sequence_parallel_torch_norm")
    def _():
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from examples.mimo.model_providers import nemotron_moe_vlm as nemotron

        ncfg = parse_config(["--model-provider", "nemotron_moe_vlm", "--train-iters", "1",
                             "--device", "cpu"], world_size=2).model
        config = nemotron.language_config(ncfg, tp=2, pp=1, ep=1, expt_tp=1,
                                          dtype=torch.float32, sequence_parallel=True)
        try:
            WrappedTorchNorm(config, 8)
            symptom = False
        except AssertionError as err:
            symptom = "sequence parallel not supported" in str(err)
        norm = layers.sequence_parallel_torch_norm()(config, 8)
        return {"symptom": symptom, "fixed": type(norm) is torch.nn.RMSNorm
                and all(p.sequence_parallel for p in norm.parameters())}

    @probe("clip_vit_model")
    def _():
        from megatron.core.models.vision.clip_vit_model import CLIPViTModel

        from examples.mimo.model_providers import common, specs

        pgc = rt.topology.module_pgc(rt.topology.module_name)
        config = common.transformer_config(tp=1, pp=1, dtype=torch.float32, num_layers=1,
                                           hidden_size=32, num_attention_heads=4)
        args = (config, specs.vit_layer_spec("local"))
        kwargs = dict(ln_pre_impl=specs.norm_class("local"), ln_post_impl=specs.norm_class("local"),
                      patch_dim=8, img_h=16, img_w=16, pg_collection=pgc)
        metadata = {"dp_cp_group": pgc.dp_cp}
        try:
            CLIPViTModel(*args, **kwargs).sharded_state_dict(metadata=metadata)
            symptom = False
        except AssertionError as err:
            symptom = "tensor model parallel group is not initialized" in str(err)
        tower = layers.clip_vit_model()(*args, **kwargs).sharded_state_dict(metadata=metadata)
        # an image side that is no multiple of the patch (20 = 2 x 8 + 4)
        refuses = raises(lambda: CLIPViTModel(*args, **dict(kwargs, img_h=20)), AssertionError)
        torch.manual_seed(0)
        cropping = layers.clip_vit_model()(*args, **dict(kwargs, img_h=20))
        upstream = CLIPViTModel(*args, **kwargs)
        upstream.load_state_dict(cropping.state_dict())
        image = torch.randn(1, 3, 20, 16)
        with torch.no_grad():
            same = torch.equal(cropping(image), upstream(image[:, :, :16]))
        return {"symptom": symptom and refuses,
                "fixed": tower["decoder.layers.0.self_attention.linear_qkv.weight"].key
                == "decoder.layers.self_attention.linear_qkv.weight" and same}

    @probe("tied_gpt_model")
    def _():
        """A last pipeline stage that is not the first, its output layer tied to the embedding."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.gpt.gpt_model import GPTModel

        from examples.mimo.model_providers import common

        pgc = rt.topology.module_pgc(rt.topology.module_name)
        config = common.transformer_config(tp=1, pp=1, dtype=torch.float32, num_layers=1,
                                           hidden_size=16, num_attention_heads=2)
        kwargs = dict(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                      vocab_size=32, max_sequence_length=8, pre_process=False, post_process=True,
                      share_embeddings_and_output_weights=True, pg_collection=pgc)
        metadata = {"dp_cp_group": pgc.dp_cp}
        try:
            GPTModel(**kwargs).sharded_state_dict(metadata=metadata)
            symptom = False
        except AssertionError as err:
            symptom = "data parallel group with CP" in str(err)
        tied = layers.tied_gpt_model()(**kwargs).sharded_state_dict(metadata=metadata)
        out = tied["output_layer.weight"]
        return {"symptom": symptom, "fixed": out.key == "embedding.word_embeddings.weight"
                and out.replica_id == (1, 0, 0)}

    @probe("packed_mamba_mixer")
    def _():
        """Only the canary runs here: the fix needs the Triton scan (test_hetero_gpu_packing)."""
        from megatron.core.packed_seq_params import PackedSeqParams
        from megatron.core.ssm.mamba_mixer import MambaMixer

        fake = types.SimpleNamespace(in_proj=lambda x: (x, None), use_mem_eff_path=False,
                                     cp=types.SimpleNamespace(pre_conv_ssm=lambda x, p: x))
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        try:
            MambaMixer.forward(fake, torch.zeros(8, 1, 4), packed_seq_params=PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, total_tokens=8))
            refused = False
        except AssertionError as err:
            refused = "Training with packed sequences is not supported" in str(err)
        return {"symptom": refused}

    rt.close()
    with open(out_path, "w") as f:
        json.dump(RESULTS, f)


def _gather_group(call):
    args, kwargs = call  # all_gather_object(object_list, obj, group=None)
    return kwargs.get("group", args[2] if len(args) > 2 else None)


def _set_max_lr(state, value):
    if isinstance(state, dict):
        for key, item in state.items():
            if key == "param_groups":
                for group in item:
                    group["max_lr"] = value
            else:
                _set_max_lr(item, value)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
