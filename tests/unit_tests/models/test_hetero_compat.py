"""The megatron-core 0.19.2 workarounds in compat.py (and the model layers among them, in
model_providers/layers.py): for each, a canary and a fix check.

A canary asserts that upstream megatron-core still shows the symptom; when one fails after an
upgrade, the workaround is no longer needed: delete it (and its probe). The fix check asserts
the workaround removes the symptom. Besides these, each workaround has a test elsewhere that
fails without it (the training path it exists for):

    global_memory_buffer               every training test (local attention's scratch buffers)
    bridge_groups                      every hetero CPU test (the bridge on gloo);
                                       test_hetero_failures::test_stopped_peer_ends_within_the_timeout
    colocated_bridge_groups            test_hetero_parity::test_fan_in_matches_reference (colocated,
                                       encoder and LLM DP sizes differ)
    refuse_pickled_checkpoint_objects  the probe below, through dist_checkpointing.load and
                                       load_common_state_dict; test_hetero_failures::
                                       test_loading_a_checkpoint_never_runs_code_from_it
    param_groups_within                test_hetero_checkpoint::test_projector_only_checkpoint
                                       (a frozen LLM branch: its ranks never join the gather)
    torch_adam_checkpoint_load         test_hetero_checkpoint::test_resume_is_bit_exact
    match_saved_param_groups           test_hetero_failures::test_resume_with_a_new_schedule
    checkpoint_writer_errors           test_hetero_failures::test_a_full_disk_is_named_and_...
    reduce_moe_metrics                 test_hetero_nemotron::test_tiny_cpu_preset_trains_in_the_hetero_loop
    local_hybrid_stack                 test_hetero_nemotron (every build of the local hybrid LLM)
    sequence_parallel_torch_norm       test_hetero_nemotron::test_sequence_parallel_tp2_matches_tp1
    clip_vit_model                     test_hetero_llava (every import into the LLaVA vision tower)
    tied_gpt_model                     test_hetero_llava::test_imported_logits_equal_transformers
                                       (LLM PP2 x TP2, tied embeddings)
    import_mamba_triton_kernels        test_hetero_nemotron::test_built_model_layers_... (Mamba presets)
    packed_mamba_mixer                 test_hetero_gpu_packing (packed vs unpacked with Mamba layers)
    checkpoint_writer_server           test_hetero_slurm::test_requeue_resumes_and_sigterm_saves
                                       (the requeue's SIGTERM reaches every process of the step);
                                       test_hetero_jobs (no process left after a killed job)
    launcher_shutdown_grace            test_hetero_jobs::test_a_stopped_rank_ends_the_job_...
    num_microbatches_for_cuda_graphs   test_hetero_gpu_te::test_cuda_graphs_replay_the_eager_losses_...
                                       (the capture reads the global micro-batch count)
"""

import importlib.util
import inspect
import json
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from examples.mimo.model_providers import layers
from examples.mimo.training.hetero import compat
from tests.unit_tests.models.dist_harness import ROOT, torchrun

PROBED = ["global_memory_buffer", "bridge_groups", "colocated_bridge_groups",
          "refuse_pickled_checkpoint_objects",
          "param_groups_within", "torch_adam_checkpoint_load", "match_saved_param_groups",
          "reduce_moe_metrics", "local_hybrid_stack", "checkpoint_writer_errors",
          "checkpoint_writer_server", "sequence_parallel_torch_norm", "clip_vit_model",
          "tied_gpt_model"]


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    work = tmp_path_factory.mktemp("compat")
    torchrun(1, "tests.unit_tests.models.workers.compat_worker", [str(work / "out.json"), str(work)],
             timeout=240)
    return json.loads((work / "out.json").read_text())


def test_every_workaround_has_a_probe():
    public = {name for module in (compat, layers)
              for name, fn in inspect.getmembers(module, callable)  # lru_cache'd ones too
              if getattr(fn, "__module__", None) == module.__name__ and not name.startswith("_")}
    assert public - {"active", "version_note", "apply_startup", "read_checkpoint_metadata"} == \
        set(PROBED) | {"import_mamba_triton_kernels", "packed_mamba_mixer",
                       "num_microbatches_for_cuda_graphs", "launcher_shutdown_grace"}


def test_canary_torchrun_still_stops_ranks_with_its_fixed_grace():
    from torch.distributed.elastic.multiprocessing import api

    assert "self.close()" in inspect.getsource(api.SubprocessContext._poll), \
        "torch's agent now passes a grace when it stops the ranks: remove compat.launcher_shutdown_grace"


def test_launcher_shutdown_grace_caps_every_close():
    from torch.distributed.elastic.multiprocessing.api import PContext

    real, seen = PContext.close, []
    context = types.SimpleNamespace(_close=lambda death_sig, timeout: seen.append(timeout),
                                    _tail_logs=[], filtered_stdout=None, filtered_stderr=None)
    try:
        compat.launcher_shutdown_grace(5)
        PContext.close(context)
        PContext.close(context, timeout=2)
    finally:
        PContext.close = real
    assert seen == [5, 2]


def test_canary_te_cuda_graph_capture_still_reads_the_global_micro_batch_count():
    from megatron.core import num_microbatches_calculator as calc
    from megatron.core.transformer.cuda_graphs import TECudaGraphHelper

    assert "get_num_microbatches()" in inspect.getsource(TECudaGraphHelper._get_cuda_graph_input_data), \
        "megatron-core no longer needs compat.num_microbatches_for_cuda_graphs: remove it"
    assert calc._GLOBAL_NUM_MICROBATCHES_CALCULATOR is None
    with pytest.raises(AttributeError):
        calc.get_num_microbatches()


def test_num_microbatches_for_cuda_graphs_sets_the_global_count():
    from megatron.core import num_microbatches_calculator as calc

    try:
        compat.num_microbatches_for_cuda_graphs(rank=0, global_batch_size=16, micro_batch_size=2,
                                                data_parallel_size=2)
        assert calc.get_num_microbatches() == 4
    finally:
        calc.unset_num_microbatches_calculator()


@pytest.mark.parametrize("name", PROBED)
def test_canary_upstream_still_shows_the_symptom(probes, name):
    assert "error" not in probes[name], probes[name].get("error")
    assert probes[name]["symptom"], f"megatron-core no longer needs compat.{name}: remove it"


@pytest.mark.parametrize("name", PROBED)
def test_workaround_removes_the_symptom(probes, name):
    assert "error" not in probes[name], probes[name].get("error")
    assert probes[name]["fixed"]


def have_mamba_mixer(*setup: str) -> str:
    code = "\n".join([*setup, "import megatron.core.ssm.mamba_mixer as m", "print(m.HAVE_MAMBA_SSM)"])
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()


needs_mamba = pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None,
                                 reason="mamba-ssm is not installed (setup_env.sh installs it)")


@needs_mamba
def test_canary_mamba_ssm_init_still_needs_its_cuda_extension():
    assert have_mamba_mixer() == "False", \
        "megatron-core finds mamba-ssm's kernels by itself: remove compat.import_mamba_triton_kernels"


@needs_mamba
def test_import_mamba_triton_kernels_lets_megatron_find_them():
    assert have_mamba_mixer("from examples.mimo.training.hetero import compat",
                            "compat.import_mamba_triton_kernels()") == "True"


def test_canary_mamba_mixer_refuses_packed_sequences_off_the_memory_efficient_path(probes):
    result = probes["packed_mamba_mixer"]
    assert "error" not in result, result.get("error")
    assert result["symptom"], "MambaMixer packs without causal-conv1d now: remove layers.packed_mamba_mixer"


def test_packed_mamba_convolution_stays_within_each_sample():
    """The short convolution of layers.packed_mamba_mixer against torch's conv1d run on each
    sample alone (the Triton scan's seq_idx is checked on the GPU, test_hetero_gpu_packing)."""
    torch.manual_seed(0)
    lengths, channels, width = [5, 1, 7, 3], 6, 4
    x = torch.randn(1, channels, sum(lengths))
    weight, bias = torch.randn(channels, 1, width), torch.randn(channels)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    packed = layers._conv1d_within_segments(x, weight, bias, seq_idx)
    alone = torch.cat([F.conv1d(part, weight, bias, padding=width - 1, groups=channels)
                       [..., :part.shape[-1]] for part in x.split(lengths, dim=-1)], dim=-1)
    torch.testing.assert_close(packed, alone, rtol=1e-6, atol=1e-6)
    # one segment: torch's causal conv exactly as megatron's unpacked path computes it
    whole = layers._conv1d_within_segments(x, weight, bias, torch.zeros_like(seq_idx))
    torch.testing.assert_close(whole, F.conv1d(x, weight, bias, padding=width - 1,
                                               groups=channels)[..., :x.shape[-1]])


def test_the_torch_adam_workaround_leaves_other_inner_optimizers_alone():
    """Seen on the H200 with transformer-engine installed, where megatron-core builds TE's
    FusedAdam: resuming failed with KeyError: 'step' in FusedAdam.state_dict, because the
    workaround for torch's Adam primed a 'step' into every parameter's state."""
    from types import SimpleNamespace

    class FusedAdamLike(torch.optim.SGD):  # any inner optimizer that is not torch's Adam
        pass

    def chained(inner):
        def init_state_fn(opt, config=None):
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p].setdefault("exp_avg", torch.zeros_like(p))
        top = SimpleNamespace(optimizer=inner, config=None, init_state_fn=init_state_fn)
        return SimpleNamespace(_active_optimizers=[top])

    fused = FusedAdamLike([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with compat.torch_adam_checkpoint_load(chained(fused)):
        pass
    assert all("step" not in state for state in fused.state.values()), dict(fused.state)
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    adam.param_groups[0]["step"] = 3
    with compat.torch_adam_checkpoint_load(chained(adam)):
        pass
    assert [float(s["step"]) for s in adam.state.values()] == [3.0]
