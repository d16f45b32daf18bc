"""Cluster launch, in process: the job shapes of the sbatch scripts, the scripts' lint, and the
layout planner (its ranking by hand-checked cases, and every layout it prints against the
trainer's validation). The real SLURM runs are test_hetero_slurm.py."""

import os
import re
import shutil
import subprocess

import pytest

from examples.mimo.cluster import planner, presets
from examples.mimo.interfaces import ModelFacts
from examples.mimo.training.hetero.config import parse_config
from tests.unit_tests.models.dist_harness import ROOT

SCRIPTS = ROOT / "examples" / "mimo" / "scripts"
SHELL = sorted(SCRIPTS.glob("*.sh")) + [ROOT / ".ci" / "run"]


def test_every_shape_has_a_script_and_the_cluster_doc_lists_them():
    assert set(presets.scripts()) == set(presets.SHAPES)
    assert presets.table() in (ROOT / "docs" / "cluster.md").read_text()


@pytest.mark.parametrize("shape", sorted(presets.SHAPES))
def test_each_shape_is_accepted_by_the_trainer_on_its_scripts_nodes(shape, tmp_path):
    """At the node count of its script, 8 GPUs a node (and the parity shape on a CPU node of 2
    ranks): the flags the job would run pass the trainer's validation, and the production
    shapes fit in 80 GiB by the planner's memory model."""
    nodes = int(presets.scripts()[shape][1])
    for per_node, device in ((8, "cuda"), (2, "cpu")) if nodes == 1 else ((8, "cuda"),):
        job = presets.job(shape, nodes=nodes, per_node=per_node, device=device, extra=[],
                          time_left="3:00:00")
        # energon's flags name data that is not here, and TE is not installed here: the same run
        # on mock data with local layer specs; --save as sbatch_job.sh adds it
        local = ["--transformer-impl", "local"] if "--transformer-impl" in job["flags"] else []
        job["flags"] = presets.without(job["flags"], "--num-workers") + [
            "--data-provider", "mock", *local, "--save", str(tmp_path)]
        cfg = parse_config(job["flags"], world_size=nodes * per_node)
        assert cfg.ckpt.exit_duration_mins == 170.0  # 3 h less the 10 min margin
        if job["reference"]:
            assert parse_config(job["reference"], world_size=nodes * per_node).grid.colocated
        if nodes > 1:
            layout = planner.Layout(cfg.grid, cfg.batch.micro_batch_size)
            provider, model = planner._model(job["flags"])
            est = planner.estimate(
                layout, facts=provider.facts(model), seq_length=cfg.batch.seq_length,
                flops_per_sample=planner._per_sample_flops(provider, model, cfg.batch.seq_length, 1.0),
                images_per_sample=1.0, global_batch=cfg.batch.global_batch_size,
                machine=planner.Machine(gpus_per_node=8, encoder_tflops=100, llm_tflops=100),
                memory_gib=planner.memory_of(cfg, provider.facts(model)))
            assert est.memory_gib < 80, est


def test_shapes_follow_the_allocation_and_refuse_what_cannot_fit():
    flags = presets.grid_flags(presets.SHAPES["nemotron-33n"], nodes=17, per_node=8)
    assert flags[:4] == ["--encoder-tp", "1", "--encoder-dp", "8"]
    assert flags[flags.index("--llm-dp") + 1] == "64"  # 16 LLM nodes x 8 / TP 2
    with pytest.raises(ValueError, match="1 node"):
        presets.grid_flags(presets.SHAPES["nemotron-9n"], nodes=1, per_node=8)
    with pytest.raises(ValueError, match="sbatch --nodes 1"):
        presets.grid_flags(presets.SHAPES["parity-small"], nodes=2, per_node=8)
    assert presets.minutes_left("1-02:03:30") == 1440 + 123.5
    assert presets.minutes_left("UNLIMITED") is None
    # a job shorter than twice the margin stops at half its time
    job = presets.job("parity-small", nodes=1, per_node=2, device="cpu", extra=[],
                      time_left="12:00")
    assert presets.last_value(job["flags"], "--exit-duration-in-mins") == "6.0"
    assert "--bf16" not in job["flags"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck (.ci/run installs it)")
def test_scripts_pass_bash_n_and_shellcheck():
    for script in SHELL:
        subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["shellcheck", *map(str, SHELL)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("codes, expected", [((0, 0), 0), ((1, 0), 1), ((0, 1), 1), ((5, 0), 0),
                                             ((0, 5), 0), ((5, 5), 5), ((2, 1), 2)])
def test_run_tests_runs_the_serial_tests_after_the_rest_alone(tmp_path, codes, expected):
    """The planner test compares the timings of two runs made one after another; with the other
    pytest worker's load in between it failed a clean-clone CI run (0.46 against a factor-2
    bound). run_tests.sh runs the `serial` tests afterwards without workers, and fails when either
    run fails (5, nothing collected, only when both collect nothing)."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n"
                    f"n=$(wc -l < {calls})\ncodes=({' '.join(map(str, codes))})\n"
                    "exit ${codes[$((n - 1))]}\n")
    fake.chmod(0o755)
    script = ROOT / "examples/mimo/scripts/run_tests.sh"
    env = {k: v for k, v in os.environ.items() if k != "HETERO_TEST_JOBS"} | {"HETERO_PYTHON": str(fake)}
    proc = subprocess.run(["bash", str(script), "-q", "-k", "x"], env=env, timeout=60)
    assert proc.returncode == expected
    assert calls.read_text().splitlines() == [
        "-m pytest -n 2 --dist loadfile -m not serial -q -k x", "-m pytest -m serial -q -k x"]
    calls.unlink()
    subprocess.run(["bash", str(script), "-m", "gpu"], env=env, timeout=60)
    assert calls.read_text().splitlines() == ["-m pytest -m gpu"]  # the caller's marker: one run


# ---- planner --------------------------------------------------------------------------------

FACTS = ModelFacts(llm_num_layers=8, llm_num_heads=8, llm_num_query_groups=8, encoder_num_heads=8,
                   num_experts=0, llm_moe_layers=0, encoder_params=10 ** 6, llm_params=10 ** 6,
                   llm_hidden_size=64, encoder_hidden_size=64, encoder_num_layers=2,
                   encoder_tokens_per_image=16)
FREE_NETWORK = dict(intra_node_gbps=1e12, inter_node_gbps=1e12, optimizer_s_per_param=1e-30)


def _ranked(flops, world, gpus_per_node, global_batch):
    machine = planner.Machine(gpus_per_node=gpus_per_node, encoder_tflops=1.0, llm_tflops=1.0,
                              **FREE_NETWORK)
    return planner.rank([planner.estimate(c, facts=FACTS, flops_per_sample=flops, seq_length=64,
                                          images_per_sample=1.0, global_batch=global_batch,
                                          machine=machine, memory_gib=0.0)
                         for c in planner.candidates(world, gpus_per_node, FACTS, global_batch)],
                        memory_gib=None)


def test_planner_balances_the_grids_by_their_flops():
    """No communication, one node of 8, global batch 96, the encoder at 1/3 of the LLM's FLOPs
    per sample (the LLM's: 1 TFLOP at 1 TFLOP/s, 1 s). By hand, the trainer's rules leave the
    encoder 2 or 4 GPUs (LLM DP 7, 5, 3 x PP... do not divide 96 with a whole encoder share):
    - 2 (TP 2) + 6 (TP 2, DP 3), micro-batch 1: the encoder rank serves 3 lanes, 3 x 1/3 / 2 =
      0.5 s per micro-batch, as the LLM's 1 / 2: balanced; 32 micro-batches + 1 of bubble: 16.5 s;
    - the same with LLM TP 1, DP 6: 1 s stages, 16 + 1: 17 s;
    - 4 + 4: at best the LLM in 4 stages of 1/4 s (PP 4), 96 micro-batches + 4: 24.25 s.
    Colocated has no bubble: 96 x 4/3 s / 8 GPUs = 16 s."""
    T = 1e12
    ranked = _ranked((T / 3, T), 8, 8, 96)
    hetero = [e for e in ranked if not e.layout.grid.colocated]
    top = hetero[0].layout
    assert (top.encoder_gpus, top.grid.encoder_tp, top.grid.llm_tp, top.grid.llm_dp,
            top.micro_batch) == (2, 2, 2, 3, 1)
    assert hetero[0].iteration_ms == pytest.approx(16_500)
    assert min(e.iteration_ms for e in hetero if e.layout.grid.llm_tp == 1 and e.layout.grid.llm_pp == 1
               and e.layout.encoder_gpus == 2) == pytest.approx(17_000)
    assert min(e.iteration_ms for e in hetero if e.layout.encoder_gpus == 4) == pytest.approx(24_250)
    assert {e.layout.encoder_gpus for e in hetero} == {2, 4}
    assert ranked[0].layout.grid.colocated and ranked[0].iteration_ms == pytest.approx(16_000)


def test_planner_prefers_colocated_when_the_pipeline_bubble_dominates():
    """Equal FLOPs per sample and 4 micro-batches a lane: hetero 4 + 4 pays (4 + 1) stage times
    of 2 samples ... colocated does 4 x (encoder + LLM) with no bubble and wins; the best is TP 1
    (no TP all-reduce cost is modelled as free, so ties break towards less TP)."""
    T = 1e12
    top = _ranked((T, T), 8, 8, 32)[0]
    assert top.layout.grid.colocated and top.layout.grid.encoder_tp == top.layout.grid.llm_tp == 1
    assert top.iteration_ms == pytest.approx(32 * 2 / 8 * 1e3)


def test_every_printed_layout_is_accepted_by_the_trainer(capsys):
    from examples.mimo.scripts.plan_layout import main

    model = ["--model-provider", "nemotron_moe_vlm", "--model-preset", "nemotron-54l"]
    assert main(["--nodes", "9", "--global-batch-size", "256", "--gpu-memory-gib", "80",
                 "--top", "50", "--", *model]) == 0
    out = capsys.readouterr().out
    lines = re.findall(r"^\d+: (.*)$", out, re.M)
    assert len(lines) == 50
    base = ["--train-iters", "1000000", *model, "--global-batch-size", "256", "--seq-length", "4096"]
    for line in lines:
        parse_config(base + line.split(), world_size=72)
    # hand-checked: the LLM has ~2.6x the encoder's FLOPs per sample on 8x the GPUs, so the
    # encoder gets the smallest whole-node share, one node, and its lanes fan out
    assert lines[0].startswith("--encoder-tp 1 --encoder-dp 8 ")
    # experts under LLM TP 2: the planner adds the sequence parallelism megatron-core requires
    assert "--llm-tp 2" in lines[0] and lines[0].endswith(" --sequence-parallel")
    assert re.search(r"^\| 1 \| hetero \| 8 \| 1/8 \|", out, re.M)


def test_a_request_no_layout_fits_gets_the_trainers_message(capsys):
    from examples.mimo.scripts.plan_layout import main

    assert main(["--nodes", "1", "--gpus-per-node", "8", "--global-batch-size", "16",
                 "--seq-length", "10", "--", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: no layout of 1 x 8 GPUs is accepted: --seq-length 10 must be >= image "
                   "tokens 16 + 2")
    assert main(["--nodes", "2", "--global-batch-size", "64", "--", "--model-provider",
                 "nemotron_moe_vlm", "--model-preset", "nemotron-99l"]) == 2
    assert "--model-preset" in capsys.readouterr().err


def test_a_measured_profile_sets_the_rates(tmp_path):
    """calibrate() on a hand-written profile: 1 encoder GPU busy 10 ms per iteration for
    F_enc FLOPs -> F_enc / 10 ms per GPU."""
    import json

    provider, model = planner._model(["--device", "cpu"])
    enc, llm = planner._per_sample_flops(provider, model, 64, 1.0)
    row = {"encoder_forward_ms": 4.0, "encoder_backward_ms": 6.0, "llm_forward_ms": 10.0,
           "llm_backward_ms": 30.0, "encoder_optimizer_ms": 1.0, "llm_optimizer_ms": 2.0}
    flags = ["--device", "cpu", "--global-batch-size", "8", "--micro-batch-size", "2",
             "--train-iters", "1"]
    (tmp_path / "p.json").write_text(json.dumps({"runs": [{"layout": "hetero", "world": 2,
                                                           "flags": flags, "row": row}]}))
    ranked, _, rates = planner.plan(["--device", "cpu"], nodes=1, gpus_per_node=2,
                                    global_batch=8, seq_length=64, profile=str(tmp_path / "p.json"))
    assert rates["encoder"] == pytest.approx(8 * enc / 10e-3 / 1e12)
    assert rates["llm"] == pytest.approx(8 * llm / 40e-3 / 1e12)
    assert ranked and all(e.iteration_ms > 0 for e in ranked)
