"""Pure configuration tests: no process group is created here."""

import math

import pytest

from examples.mimo.training.hetero.config import build_parser, parse_config
from examples.mimo.training.hetero.optim import build_scheduler

BASE = ["--train-iters", "10"]


def cfg(*args, world=2):
    return parse_config([*BASE, *args], world_size=world)


@pytest.mark.parametrize("args,world,layout", [
    ([], 2, (1, 1, 1, 1, 1)),
    (["--llm-dp", "2"], 3, (1, 1, 1, 1, 2)),
    (["--encoder-dp", "2", "--llm-dp", "2"], 4, (1, 2, 1, 1, 2)),
    (["--encoder-tp", "2", "--llm-tp", "2", "--llm-pp", "2"], 6, (2, 1, 2, 2, 1)),
    (["--llm-only", "--llm-dp", "2"], 2, (1, 1, 1, 1, 2)),
    (["--colocated", "--encoder-dp", "2", "--llm-tp", "2", "--mock-text-only-fraction", "0"], 2,
     (1, 2, 2, 1, 1)),
])
def test_good_layouts(args, world, layout):
    c = cfg(*args, world=world)
    g = c.grid
    assert (g.encoder_tp, g.encoder_dp, g.llm_tp, g.llm_pp, g.llm_dp) == layout
    assert g.world_size == world
    assert c.batch.num_microbatches == 8 // (2 * g.llm_dp)


@pytest.mark.parametrize("args,world,needles", [
    ([], 3, ["world size 3", "--encoder-tp 1", "--llm-dp 1"]),
    (["--llm-only"], 2, ["world size 2", "--llm-only"]),
    (["--llm-tp", "0"], 2, ["--llm-tp 0"]),
    (["--global-batch-size", "6", "--llm-dp", "2"], 3,
     ["--global-batch-size 6", "--micro-batch-size 2", "--llm-dp 2"]),
    (["--encoder-dp", "4", "--llm-dp", "2", "--micro-batch-size", "1"], 6,
     ["--micro-batch-size 1", "--llm-dp 2", "--encoder-dp 4"]),
    (["--llm-ep", "2", "--llm-dp", "2"], 3, ["--llm-ep 2", "no experts"]),
    (["--llm-ep", "4", "--llm-dp", "2"], 3, ["--llm-ep 4", "--llm-expt-tp 1", "--llm-dp 2"]),
    (["--llm-tp", "3"], 4, ["--llm-tp 3", "4 attention heads"]),
    # Found on CPU/gloo (issue 16): megatron-core's BridgeCommunicator raised after the groups.
    (["--encoder-dp", "2", "--llm-tp", "2", "--llm-dp", "3", "--mock-text-only-fraction", "0",
      "--global-batch-size", "12"], 8,
     ["--encoder-dp 2", "--llm-dp 3", "multiple"]),
    (["--sequence-parallel", "--llm-tp", "2"], 3, ["--sequence-parallel", "--model-provider"]),
    (["--encoder-tp", "3"], 4, ["--encoder-tp 3", "4 attention heads"]),
    (["--llm-pp", "3"], 4, ["--llm-pp 3", "2 layers"]),
    (["--context-parallel-size", "2"], 2, ["--context-parallel-size 2"]),
    (["--bf16", "--device", "cpu"], 2, ["--bf16", "--device cuda"]),
    (["--seq-length", "10"], 2, ["--seq-length 10", "image tokens 16"]),
    (["--encoder-dp", "2"], 3, ["--mock-text-only-fraction 0.25", "--encoder-dp"]),
    (["--num-attention-heads", "5"], 2, ["--num-attention-heads 5", "--hidden-size 64"]),
    (["--model-provider", "nope"], 2, ["--model-provider 'nope'", "mock"]),
    (["--data-provider", "nope"], 2, ["--data-provider 'nope'", "mock"]),
    (["--ddp-bucket-size", "0"], 2, ["--ddp-bucket-size 0"]),
    (["--distributed-timeout-minutes", "0"], 2, ["--distributed-timeout-minutes 0"]),
    (["--log-interval", "0"], 2, ["--log-interval 0"]),
    (["--clip-grad", "-1"], 2, ["--clip-grad -1"]),
    (["--weight-decay", "-1"], 2, ["--weight-decay -1"]),
    (["--lr", "0"], 2, ["--lr > 0"]),
    (["--lr-warmup-iters", "-1"], 2, ["--lr-warmup-iters -1"]),
    (["--micro-batch-size", "0"], 2, ["--micro-batch-size 0"]),
    (["--encoder-dp", "0"], 1, ["--encoder-dp 0"]),
    (["--llm-expt-tp", "0"], 2, ["--llm-expt-tp 0"]),
    (["--hidden-size", "0"], 2, ["--hidden-size 0"]),
    (["--encoder-num-attention-heads", "3"], 2, ["--encoder-num-attention-heads 3",
                                                  "--encoder-hidden-size 32"]),
    (["--save-interval", "5"], 2, ["--save-interval 5 needs --save"]),
    (["--save", "x", "--save-interval", "0"], 2, ["--save-interval 0 must be >= 1"]),
    (["--exit-interval", "0"], 2, ["--exit-interval 0 must be >= 1"]),
    (["--no-save-optim"], 2, ["--no-save-optim needs --save"]),
    (["--no-load-optim", "--finetune"], 2, ["--no-load-optim, --finetune need --load"]),
    (["--no-load-rng"], 2, ["--no-load-rng need --load"]),
    (["--llm-only", "--load-vision-from", "x"], 1, ["--load-vision-from", "--llm-only"]),
    (["--mock-text-only-fraction", "1.5"], 2, ["--mock-text-only-fraction 1.5"]),
    (["--max-consecutive-skipped-iters", "-1"], 2, ["--max-consecutive-skipped-iters -1"]),
    (["--allow-existing-save"], 2, ["--allow-existing-save needs --save"]),
    (["--override-opt_param-scheduler"], 2, ["--override-opt_param-scheduler need --load"]),
    (["--load", "x", "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], 2,
     ["--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude"]),
    (["--vocab-size", "2"], 2, ["--vocab-size 2"]),
    (["--eval-interval", "0"], 2, ["--eval-interval 0 must be >= 1"]),
    (["--save", "s", "--exit-duration-in-mins", "0"], 2, ["--exit-duration-in-mins 0.0 must be > 0"]),
    (["--exit-signal", "SIGKILL"], 2, ["--exit-signal", "SIGKILL"]),
    (["--exit-signal-handler", "--exit-duration-in-mins", "5"], 2,
     ["--exit-signal-handler, --exit-duration-in-mins save before exiting: needs --save"]),
    (["--eval-iters", "0"], 2, ["--eval-iters 0 must be >= 1"]),
    (["--colocated", "--llm-only"], 1, ["--colocated and --llm-only exclude each other"]),
    (["--colocated", "--llm-pp", "2"], 2, ["--colocated needs --llm-pp 1"]),
    (["--colocated", "--encoder-dp", "2"], 2, ["--colocated puts both modules on all 2 ranks",
                                                "--llm-tp 1 x --llm-dp 1 = 1"]),
    (["--colocated", "--encoder-dp", "2", "--llm-tp", "2"], 2,
     ["--mock-text-only-fraction 0.25 must be 0 with --colocated with --encoder-dp 2, --llm-dp 1"]),
    (["--encoder-dp", "2"], 3, ["0.25 must be 0 with fan-in (--encoder-dp 2, --llm-dp 1)"]),
    (["--patch-dim", "5"], 2, ["--patch-dim 5", "--img-h 16"]),
    (["--spiky-loss-factor", "1"], 2, ["--spiky-loss-factor 1.0 must be > 1"]),
    (["--save", "s", "--keep-latest-checkpoints", "-1"], 2,
     ["--keep-latest-checkpoints -1 must be >= 0"]),
    (["--keep-latest-checkpoints", "2"], 2, ["--keep-latest-checkpoints 2 needs --save"]),
])
def test_bad_layouts_name_the_flags(args, world, needles):
    with pytest.raises(ValueError) as err:
        cfg(*args, world=world)
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize("args,needles", [
    ([], ["--train-iters", "--train-samples"]),
    (["--train-iters", "5", "--train-samples", "40"], ["exactly one"]),
    (["--train-samples", "40", "--lr-warmup-iters", "1"], ["--lr-warmup-iters", "--lr-warmup-samples"]),
    (["--train-iters", "5", "--lr-decay-samples", "9"], ["--lr-decay-samples", "--lr-decay-iters"]),
    (["--train-iters", "5", "--lr-warmup-iters", "5"], ["--lr-warmup-iters", "--lr-decay-iters"]),
    (["--train-iters", "5", "--lr-decay-style", "WSD"], ["WSD", "--lr-wsd-decay-iters"]),
    (["--train-iters", "5", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "9",
      "--lr-wsd-decay-style", "linear"], ["--lr-wsd-decay-iters"]),
    (["--train-iters", "5", "--lr-wsd-decay-iters", "2"], ["--lr-decay-style WSD"]),
    (["--train-iters", "5", "--min-lr", "1", "--lr", "0.1"], ["--min-lr"]),
])
def test_bad_schedules_name_the_flags(args, needles):
    with pytest.raises(ValueError) as err:
        parse_config(args, world_size=2)
    for needle in needles:
        assert needle in str(err.value)


def test_help_shows_groups():
    text = build_parser().format_help()
    for group in ("hetero grids", "batch", "training and learning-rate schedule",
                  "distributed data parallel", "runtime", "mock model provider", "mock data provider"):
        assert group in text


def test_train_samples_sets_iterations_and_sample_units():
    c = parse_config(["--train-samples", "100", "--lr-warmup-samples", "12",
                      "--lr-decay-samples", "90"], world_size=2)
    assert c.schedule.train_iters == math.ceil(100 / 8) == 13
    assert (c.schedule.warmup_samples, c.schedule.decay_samples) == (12, 90)
    c = parse_config(["--train-iters", "10", "--lr-warmup-iters", "2"], world_size=2)
    assert (c.schedule.warmup_samples, c.schedule.decay_samples) == (16, 80)


class _Opt:
    def __init__(self):
        self.param_groups = [{"wd_mult": 1.0}]


LR, MIN_LR, G = 1e-3, 1e-4, 8  # global batch 8: one scheduler step per 8 samples


@pytest.mark.parametrize("style,half", [
    ("linear", 0.5), ("cosine", 0.5),
    ("exponential", 2 * 0.5 ** 0.5 - 1), ("minus_sqrt", 1 - 0.5 ** 0.5),
])
def test_wsd_schedule(style, half):
    # 20 iterations: warmup 4, stable until 12, WSD anneal over the last 8.
    c = parse_config(["--train-iters", "20", "--lr", str(LR), "--min-lr", str(MIN_LR),
                      "--lr-warmup-iters", "4", "--lr-decay-style", "WSD",
                      "--lr-wsd-decay-iters", "8", "--lr-wsd-decay-style", style], world_size=2)
    opt = _Opt()
    sched = build_scheduler(opt, c)
    lr_at = {}
    for it in range(21):
        lr_at[it] = opt.param_groups[0]["lr"]
        sched.step(increment=G)
    assert lr_at[0] == 0.0
    assert lr_at[2] == pytest.approx(LR / 2)
    assert lr_at[4] == pytest.approx(LR)  # warmup end
    assert lr_at[8] == lr_at[12] == pytest.approx(LR)  # stable phase
    assert lr_at[16] == pytest.approx(MIN_LR + half * (LR - MIN_LR))
    assert lr_at[20] == pytest.approx(MIN_LR)  # end of each decay style
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01)


def test_checkpoint_flags_accepted():
    c = cfg("--save", "s", "--load", "l", "--save-interval", "5", "--exit-interval", "7",
            "--no-load-optim", "--no-load-rng", "--no-load-scheduler", "--finetune",
            "--load-language-from", "lm", "--load-vision-from", "vit")
    k = c.ckpt
    assert (k.save, k.load, k.save_interval, k.exit_interval) == ("s", "l", 5, 7)
    assert k.no_load_optim and k.no_load_rng and k.no_load_scheduler and k.finetune
    assert (k.load_language_from, k.load_vision_from) == ("lm", "vit")
