"""In-process tests of pure pieces: run state objects, lane layout, provider protocols, module
seams, the dry run and one-line configuration errors. No process group, no torchrun."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.mimo import train_hetero
from examples.mimo.data import DATA_PROVIDERS
from examples.mimo.data.lanes import ENCODER, LLM, LaneIterator, rank_layout, sample_indices
from examples.mimo.interfaces import DataProvider, ModelProvider
from examples.mimo.model_providers import MODEL_PROVIDERS
from examples.mimo.training.hetero.config import parse_config
from examples.mimo.training.hetero.state import TrainState

ROOT = Path(__file__).resolve().parents[3]


def test_train_state_counts_skips_and_round_trips():
    s = TrainState()
    for skipped in (False, True, True, False, True):
        s.advance(global_batch=8, skipped=skipped)
    assert (s.iteration, s.consumed_samples, s.skipped_iterations, s.consecutive_skipped) == \
        (5, 40, 3, 1)
    t = TrainState()
    t.load_state_dict(s.state_dict())
    assert t == s


def test_lane_iterator_state_round_trips():
    layout = rank_layout(role=LLM, dp_rank=1, micro_batch_size=2, llm_dp=2, encoder_dp=1,
                         num_microbatches=3)
    make = lambda i: i  # noqa: E731
    a = LaneIterator(layout, make, list)
    seen = [next(a) for _ in range(3 * 2)]  # two global batches
    b = LaneIterator(layout, make, list)
    b.load_state_dict(a.state_dict())
    assert a.state_dict() == {"consumed_samples": 2 * 12}
    assert next(b) == next(a) == [26, 27]
    assert seen[0] == [2, 3]
    with pytest.raises(ValueError, match="consumed samples 5 is not a whole number"):
        b.load_state_dict({"consumed_samples": 5})


def test_mock_val_split_has_other_samples_of_the_same_form():
    from examples.mimo.data import mock
    from examples.mimo.interfaces import DataSpec, RankData

    cfg = mock.MockDataConfig(text_only_fraction=0.0, text_vocab=None)
    spec = DataSpec(vocab_size=64, image_token_id=63, image_tokens=4, image_shape=(3, 8, 8))
    rank = RankData(is_llm=True, dp_rank=0, llm_dp=1, encoder_dp=1, micro_batch_size=2,
                    num_microbatches=1, seq_length=16, seed=3, with_images=True)
    train, val = (next(mock.build_iterator(cfg, spec=spec, rank=rank, to_model=dict, split=split))
                  for split in ("train", "val"))
    assert {k: v.shape for k, v in train.items()} == {k: v.shape for k, v in val.items()}
    assert not torch.equal(train["input_ids"], val["input_ids"])
    with pytest.raises(ValueError, match="not 'test'"):
        mock.build_iterator(cfg, spec=spec, rank=rank, to_model=dict, split="test")


def test_data_wait_counts_the_time_spent_in_next_and_resets():
    import time

    from examples.mimo.training.hetero.logger import DataWait

    def slow():
        while True:
            time.sleep(0.02)
            yield 1

    timed = DataWait(slow())
    start = time.perf_counter()
    assert [next(timed) for _ in range(3)] == [1, 1, 1]
    time.sleep(0.05)  # time between next() calls is not data time
    elapsed = time.perf_counter() - start
    waited = timed.take()
    assert 0.06 <= waited <= elapsed - 0.05 and timed.take() == 0.0


@pytest.mark.parametrize("llm_dp, encoder_dp", [(1, 1), (2, 1), (4, 2), (2, 2), (1, 2), (2, 4)])
def test_lanes_and_encoder_ranks_cover_each_micro_batch_exactly_once(llm_dp, encoder_dp):
    """Fan-out, one-to-one and fan-in: in every micro-batch the LLM lanes and the encoder ranks
    each take every sample once, and the encoder ranks in the bridge's DP order."""
    m, n = 2, 3
    for step in range(2):
        for mb in range(n):
            lanes = [sample_indices(rank_layout(role=LLM, dp_rank=r, micro_batch_size=m,
                                                llm_dp=llm_dp, encoder_dp=encoder_dp,
                                                num_microbatches=n), step, mb)
                     for r in range(llm_dp)]
            encoders = [sample_indices(rank_layout(role=ENCODER, dp_rank=r, micro_batch_size=m,
                                                   llm_dp=llm_dp, encoder_dp=encoder_dp,
                                                   num_microbatches=n), step, mb)
                        for r in range(encoder_dp)]
            flat = [i for lane in lanes for i in lane]
            assert flat == [i for enc in encoders for i in enc]
            start = step * m * llm_dp * n + mb * m * llm_dp
            assert flat == list(range(start, start + m * llm_dp))


@pytest.mark.parametrize("name", sorted(MODEL_PROVIDERS))
def test_model_providers_satisfy_the_protocol(name):
    assert isinstance(MODEL_PROVIDERS[name], ModelProvider)


@pytest.mark.parametrize("name", sorted(DATA_PROVIDERS))
def test_data_providers_satisfy_the_protocol(name):
    assert isinstance(DATA_PROVIDERS[name], DataProvider)


def imports_of(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_training_modules_reach_providers_only_through_the_runtime():
    """The topology imports no model provider; the loop and step use Runtime's resolved
    providers, not the registries."""
    hetero = ROOT / "examples/mimo/training/hetero"
    assert not [m for m in imports_of(hetero / "topology.py") if "model_providers" in m]
    for name in ("loop.py", "run.py", "step.py", "checkpointing.py", "optim.py", "grad_sync.py"):
        bad = [m for m in imports_of(hetero / name)
               if m in ("examples.mimo.model_providers", "examples.mimo.data")]
        assert not bad, (name, bad)


def import_graph(root: Path):
    """{module: modules of examples.mimo it imports (at any depth of the file)} of the package's
    modules; ``from package import name`` goes to the module ``name`` when there is one."""
    package = root / "examples" / "mimo"
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                for alias in node.names:
                    name = f"{node.module}.{alias.name}"
                    targets.add(name if name in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        graph[module] = targets - {module}
    return graph


# Lower layers never import higher ones: shared pure definitions, then the providers and the
# data (neither imports the other), then the trainer and the tools around it.
LAYERS = {"examples.mimo.flags": 0, "examples.mimo.interfaces": 0, "examples.mimo.images": 0,
          "examples.mimo.model_providers": 1, "examples.mimo.data": 1}


def layer_of(module: str) -> int:
    for prefix, level in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return level
    return 2


def test_imports_never_run_back_up_the_layers_and_form_no_cycle():
    graph = import_graph(ROOT)
    up = [(m, t) for m, targets in graph.items() for t in targets
          if layer_of(t) > layer_of(m) or (layer_of(m) == layer_of(t) == 1
                                           and m.split(".")[2] != t.split(".")[2])]
    assert up == []
    state = {}

    def cycle_from(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                return path + [m, t]
            if t not in state and (found := cycle_from(t, path + [m])):
                return found
        state[m] = "done"
        return None

    cycles = [c for m in sorted(graph) if m not in state and (c := cycle_from(m, []))]
    assert cycles == []


def test_no_megatron_core_workaround_is_applied_at_import():
    """Importing every training module patches nothing (a fresh interpreter): compat applies
    its workarounds at start-up."""
    code = """
import sys
import examples.mimo.train_hetero, examples.mimo.launch, examples.mimo.training.hetero.loop
from examples.mimo.training.hetero import compat
from megatron.core.dist_checkpointing.strategies import torch as dcp
from megatron.core.pipeline_parallel.bridge_communicator import BridgeCommunicator as B
print(compat.active(), dcp.MCoreLoadPlanner.load_bytes.__module__,
      B._get_or_create_bridge_pg.__func__.__module__, "mamba_ssm" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["[]", "torch.distributed.checkpoint.default_planner",
                   "megatron.core.pipeline_parallel.bridge_communicator", "False"]


def test_dry_run_prints_the_layout(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setattr(train_hetero, "quiet_library_warnings", lambda **kw: None)
    train_hetero.main(["--dry-run", "--train-iters", "3", "--encoder-dp", "2", "--llm-dp", "4",
                       "--global-batch-size", "16", "--mock-text-only-fraction", "0"])
    out = capsys.readouterr().out
    facts = MODEL_PROVIDERS["mock"].facts(parse_config(["--train-iters", "3"], world_size=2).model)
    assert "world size 6" in out
    assert "encoder grid: ranks 0-1, tp 1 x dp 2" in out
    assert "LLM grid: ranks 2-5, tp 1 x pp 1 x dp 4" in out
    assert "global 16 = micro-batch 2 x 4 lanes (LLM DP) x 2 micro-batches" in out
    assert "4 samples per micro-batch: 2 lane(s), fan-out" in out
    assert f"parameters: encoder {facts.encoder_params:,} (ViT + projector), LLM " \
           f"{facts.llm_params:,}" in out


@pytest.mark.parametrize("argv, message", [
    (["--train-iter", "5"], "error: unrecognized arguments: --train-iter 5"),
    (["--train-iters", "5", "--llm-dp", "x"], "error: argument --llm-dp: invalid int value: 'x'"),
    (["--train-iters", "5", "--llm-dp", "2"], "error: world size 2 != encoder ranks"),
    (["--train-iters", "5", "--model-provider", "nemotron_moe_vlm", "--dynamic-resolution"],
     "error: --dynamic-resolution needs images of their own sizes: use --data-provider energon"),
])
def test_configuration_errors_are_one_line_and_exit_2(argv, message, capfd, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(train_hetero, "quiet_library_warnings", lambda **kw: None)
    monkeypatch.setattr(train_hetero.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit) as exit_:
        train_hetero.run(argv)
    assert exit_.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_the_nonfinite_check_finds_nan_and_inf_without_a_gradient_sized_temporary():
    """The skip decision's check runs over every gradient buffer. torch.isfinite(x).all()
    materialises |x|, 4 bytes per parameter: 24.3 GiB asked for on the 54-layer shape with 16
    experts, an out-of-memory on the H200. Here the largest tensor any op creates is recorded."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from examples.mimo.training.hetero.grad_sync import any_nonfinite

    def storages(tree):
        return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = storages((args, kwargs))
            for t in tree_leaves(out):  # new memory only: views of an input are free
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    buffers = [torch.randn(1 << 20), torch.randn(1000, dtype=torch.bfloat16), torch.zeros(0)]
    with Largest():
        assert not bool(any_nonfinite(buffers))
    assert Largest.numel <= 2 * len(buffers), Largest.numel
    for bad in (float("nan"), float("inf"), float("-inf")):
        for i in (0, 1):
            poisoned = [b.clone() for b in buffers]
            poisoned[i][-1] = bad
            assert bool(any_nonfinite(poisoned)), (bad, i)


def test_the_test_launcher_starts_its_jobs_on_no_port_chosen_in_advance(monkeypatch):
    """Seen in a clean-clone CI run: free_port() returned a free port, another process (the other
    pytest worker's job) bound it before torchrun's agent did, and test_projector_only_checkpoint
    failed with EADDRINUSE at the rendezvous, before any rank ran. The harness now launches with
    --standalone, which fork_run must honour by binding its store on a port of the OS's choosing
    (config_from_args() alone binds the static --master-port)."""
    import socket
    import subprocess
    import sys

    from tests.unit_tests.models import dist_harness

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a harness that went back to choosing its port in advance would get the taken one
        monkeypatch.setattr(dist_harness, "free_port", lambda: port)
        proc = dist_harness.torchrun(1, "platform", [], timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        direct = subprocess.run([sys.executable, "-m", "tests.unit_tests.models.fork_run",
                                 "--standalone", "--master-port", str(port), "--nproc-per-node",
                                 "1", "-m", "platform"], cwd=dist_harness.ROOT,
                                env=dist_harness.job_env(), capture_output=True, text=True,
                                timeout=120)
        assert direct.returncode == 0, direct.stderr[-3000:]


def test_a_rank_the_test_launcher_stops_prints_where_it_was(tmp_path):
    """Seen in CI: three ranks timed out waiting for a fourth at the default group's store, and
    the fourth, blocked in C, said nothing before it was killed. Each rank now prints its threads'
    stacks when the agent stops it."""
    from tests.unit_tests.models import dist_harness

    (tmp_path / "stuck_or_failing.py").write_text(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    time.sleep(2)\n"
        "    sys.exit(3)\n"
        "time.sleep(120)\n")
    env = dist_harness.job_env()
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    proc = dist_harness.torchrun(2, "stuck_or_failing", [], timeout=100, check=False, env=env)
    assert proc.returncode != 0
    stopped = 'stuck_or_failing.py", line 5'  # rank 0's sleep
    assert "most recent call first" in proc.stderr and stopped in proc.stderr, proc.stderr[-3000:]


def test_the_start_up_line_takes_the_slowest_rank_per_phase():
    """A hetero job's ranks spend their start-up differently (an encoder rank builds a small
    model, an LLM rank a large one and compiles more kernels): the line shows, per phase, the rank
    that held the job up, and the slowest rank's whole start-up."""
    from examples.mimo.training.hetero.timers import startup_line

    encoder = {"model": 1.0, "optimizer": 0.5, "first iteration": 30.0}
    llm = {"model": 9.0, "optimizer": 2.0, "first iteration": 12.0}
    assert startup_line([encoder, llm]) == ("start-up, slowest rank per phase: model 9.0 s, "
                                            "optimizer 2.0 s; first iteration 30.0 s (slowest "
                                            "rank in all: 31.5 s)")


@pytest.mark.parametrize("tflops, shown", [(356.4, "356 TFLOP/s"), (1.234, "1.23 TFLOP/s"),
                                           (0.0123, "12.3 GFLOP/s"), (4.5e-6, "4.5 MFLOP/s"),
                                           (None, "-")])
def test_flop_rates_keep_three_digits_at_any_scale(tflops, shown):
    """Before: a CPU run's line read "TFLOP/s/GPU: 0.0"."""
    from examples.mimo.training.hetero.logger import flop_rate

    assert flop_rate(tflops) == shown


def test_library_notices_are_counted_and_ours_shown():
    """Before: the main command's stderr held 44 lines of library warnings (20 of them notices
    with nothing to act on: experimental APIs, TE/apex fallbacks, deprecations inside torch and
    megatron-core). They are counted now; ours and unknown ones are shown."""
    from examples.mimo.training.hetero.notices import PACKAGE, is_notice

    lib = "/site-packages/megatron/core/optimizer/__init__.py"
    ours = os.path.join(PACKAGE, "model_providers", "common.py")
    assert is_notice(UserWarning, "Transformer Engine and Apex are not installed. Falling back", lib)
    assert is_notice(UserWarning, "MimoModel is experimental and still under development", ours)
    assert is_notice(FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated", lib)
    assert not is_notice(DeprecationWarning, "torch.jit.script_method is deprecated", ours)
    assert not is_notice(UserWarning, "the loss is NaN", lib)
    assert not is_notice(RuntimeWarning, "overflow encountered", lib)


def test_compiled_kernels_are_kept_with_the_run(tmp_path, monkeypatch):
    """Triton's and inductor's caches go under --kernel-cache-dir or <--save>/kernel-cache, where
    a requeued job finds them (before: ~/.triton and /tmp of whichever node ran the job); a
    caller's own setting wins."""
    from examples.mimo.training.hetero.device import kernel_cache_env

    save = str(tmp_path / "run")
    assert kernel_cache_env(None, save, {}) == {
        "TRITON_CACHE_DIR": f"{save}/kernel-cache/triton",
        "TORCHINDUCTOR_CACHE_DIR": f"{save}/kernel-cache/inductor"}
    assert kernel_cache_env("/cache", save, {"TRITON_CACHE_DIR": "/mine"}) == {
        "TORCHINDUCTOR_CACHE_DIR": "/cache/inductor"}
    assert kernel_cache_env(None, None, {}) == {}
    environ = {"WORLD_SIZE": "2"}
    monkeypatch.setattr(train_hetero.os, "environ", environ)
    monkeypatch.setattr(train_hetero, "quiet_library_warnings", lambda **kw: None)
    train_hetero.main(["--dry-run", "--train-iters", "3", "--save", save])
    assert environ["TRITON_CACHE_DIR"] == f"{save}/kernel-cache/triton"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"--kernel-cache-dir {tmp_path}/file is a file, not a "
                                         f"directory"):
        parse_config(["--train-iters", "1", "--kernel-cache-dir", str(tmp_path / "file")],
                     world_size=2)
