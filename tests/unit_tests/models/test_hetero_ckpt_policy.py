"""In-process tests of checkpoint policy: --load/--save path checks, checkpoint discovery, stale
saves, the resume policy, the run record's schemas, the flag declarations the policy reads, and
checksums. No process group, no torchrun."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from examples.mimo import flags
from examples.mimo.data import DATA_PROVIDERS, energon, hf
from examples.mimo.data import mock as mock_data
from examples.mimo.model_providers import MODEL_PROVIDERS, llava
from examples.mimo.model_providers import mock as mock_model
from examples.mimo.model_providers import nemotron_moe_vlm as nemotron
from examples.mimo.training.hetero import ckpt_policy as policy
from examples.mimo.training.hetero import record
from examples.mimo.training.hetero.config import GROUPS, TrainConfig, build_parser, parse_config
from examples.mimo.training.hetero.errors import CheckpointError

BASE = ["--train-iters", "4", "--lr-warmup-iters", "1"]


def config(*args, world=2):
    return parse_config([*BASE, *args], world_size=world)


def fake_checkpoint(root, iteration, tracker=True):
    d = root / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    (d / "metadata.json").write_text("{}")
    (d / ".metadata").write_bytes(b"m")
    if tracker:
        (root / policy.TRACKER).write_text(str(iteration))
    return d


# ---- --load / --save against the file system -------------------------------------------------

def test_load_naming_a_regular_file_is_an_error(tmp_path):
    f = tmp_path / "ckpt"
    f.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"--load {f} is a file"):
        policy.check_paths(config("--load", str(f)).ckpt)


def test_missing_load_is_a_typo_unless_it_is_also_save(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 10)
    with pytest.raises(ValueError, match="--load .*/rnu does not exist"):
        policy.check_paths(config("--load", str(tmp_path / "rnu"), "--save", str(run),
                                  "--allow-existing-save").ckpt)
    with pytest.raises(ValueError, match="does not exist"):
        policy.check_paths(config("--load", str(tmp_path / "rnu")).ckpt)
    # Auto-resume: the first job of a run whose --load is its --save.
    first = str(tmp_path / "new")
    policy.check_paths(config("--load", first, "--save", first).ckpt)


def test_save_over_checkpoints_of_another_run_is_refused(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 10)
    with pytest.raises(ValueError, match=r"already holds checkpoints \(iter_0000010, "
                                         r"latest_checkpointed_iteration.txt\).*no --load"):
        policy.check_paths(config("--save", str(run)).ckpt)
    with pytest.raises(ValueError, match="does not resume"):
        policy.check_paths(config("--save", str(run), "--load", str(tmp_path)).ckpt)
    policy.check_paths(config("--save", str(run), "--allow-existing-save").ckpt)
    policy.check_paths(config("--save", str(run), "--load", str(run)).ckpt)  # a resume


def test_finetune_never_writes_into_the_directory_it_loads(tmp_path):
    run = tmp_path / "pretrain"
    fake_checkpoint(run, 10)
    with pytest.raises(ValueError, match="--finetune would write"):
        policy.check_paths(config("--load", str(run), "--save", str(run), "--finetune").ckpt)
    policy.check_paths(config("--load", str(run), "--save", str(run), "--finetune",
                              "--allow-existing-save").ckpt)
    policy.check_paths(config("--load", str(run), "--save", str(tmp_path / "sft"),
                              "--finetune").ckpt)


def test_save_that_cannot_be_a_directory_is_found_at_start_up(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=f"--save {f} cannot hold checkpoints: it is a file"):
        policy.check_paths(config("--save", str(f)).ckpt)
    with pytest.raises(ValueError, match=f"cannot hold checkpoints: {f} is a file"):
        policy.check_paths(config("--save", str(f / "deeper" / "ckpt")).ckpt)


@pytest.mark.parametrize("save", ["/proc/hetero-x", "/sys/hetero-x"])
def test_save_where_no_file_can_be_created_is_found_at_start_up(save):
    """Before: permission bits said /proc and /sys were writable (root), so the job trained and
    failed at its first save."""
    with pytest.raises(ValueError, match=f"--save {save} cannot hold checkpoints: cannot create a "
                                         f"file in /(proc|sys)"):
        policy.check_paths(config("--save", save).ckpt)


def test_pretrained_source_must_be_a_directory(tmp_path):
    with pytest.raises(ValueError, match="--load-language-from .* is not a directory"):
        policy.check_paths(config("--load-language-from", str(tmp_path / "nope")).ckpt)


# ---- discovery and stale saves ---------------------------------------------------------------

def test_discovery_finds_the_tracked_iteration(tmp_path):
    path = fake_checkpoint(tmp_path, 7)
    assert policy.find_checkpoint(str(tmp_path)) == (7, str(path))
    assert policy.find_checkpoint(str(tmp_path / "empty")) is None


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / policy.TRACKER).write_text("two"),
     "should hold an iteration number, found 'two'"),
    (lambda root: (root / policy.TRACKER).unlink(), "is missing but"),
    (lambda root: (root / policy.TRACKER).write_text("9"),
     "names iteration 9 but .*iter_0000009 does not exist"),
    (lambda root: (root / "iter_0000007" / "metadata.json").unlink(), "iter_0000007 is incomplete"),
])
def test_discovery_rejects_broken_checkpoints(tmp_path, damage, message):
    fake_checkpoint(tmp_path, 7)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        policy.find_checkpoint(str(tmp_path))


def test_load_at_an_iteration_directory_loads_that_iteration(tmp_path):
    """Before: --load run/iter_0000005 found no tracker there and trained from scratch (exit 0)."""
    run = tmp_path / "run"
    five = fake_checkpoint(run, 5)
    fake_checkpoint(run, 9)
    assert policy.find_checkpoint(str(five)) == (5, str(five))
    # resuming the latest iteration through its directory is a resume of the run itself
    policy.check_paths(config("--load", str(run / "iter_0000009"), "--save", str(run)).ckpt)
    with pytest.raises(ValueError, match="--load .*iter_0000005 is an earlier iteration of --save "
                                         ".*run .*latest: .*iter_0000009.*replace that run's later"):
        policy.check_paths(config("--load", str(five), "--save", str(run)).ckpt)
    policy.check_paths(config("--load", str(five), "--save", str(tmp_path / "branch")).ckpt)


def test_load_at_the_folder_above_runs_is_refused_naming_them(tmp_path):
    """Before: --load at the folder holding runs found no tracker and trained from scratch."""
    fake_checkpoint(tmp_path / "a", 3)
    fake_checkpoint(tmp_path / "b", 4)
    (tmp_path / "logs").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path} holds no checkpoint of its own but runs "
                                              f"below it \\({tmp_path}/a, {tmp_path}/b\\): point "
                                              f"--load at one of them"):
        policy.find_checkpoint(str(tmp_path))


def test_retention_keeps_the_newest_the_resumed_and_the_known_good(tmp_path):
    for i in (2, 4, 6, 8, 10):
        fake_checkpoint(tmp_path, i)
    victims = policy.retention_victims(str(tmp_path), 2, protected={4, 8})
    assert victims == [str(tmp_path / "iter_0000002"), str(tmp_path / "iter_0000006")]
    # the tracker's iteration is kept whatever it is
    (tmp_path / policy.TRACKER).write_text("2")
    assert policy.retention_victims(str(tmp_path), 1, protected=()) == \
        [str(tmp_path / f"iter_{i:07d}") for i in (4, 6, 8)]
    assert policy.retention_victims(str(tmp_path), 0, protected=()) == []
    # a deletion is a rename out of the run first; one cut short is cleared by the next job
    policy.remove_checkpoint(str(tmp_path / "iter_0000004"))
    (tmp_path / ".trash-iter_0000006").mkdir()
    assert policy.remove_stale_saves(str(tmp_path)) == [
        f"removed {tmp_path}/.trash-iter_0000006: an incomplete deletion left by an earlier job"]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000006", "iter_0000008",
                                            "iter_0000010", policy.TRACKER]


def test_a_failed_save_does_not_block_the_relaunch(tmp_path):
    """A first save that failed left iter_N.tmp and no tracker: the next job starts fresh and
    removes it (before: 'tracker is missing but ... holds iter_0000004.tmp')."""
    (tmp_path / "iter_0000004.tmp").mkdir()
    (tmp_path / "iter_0000004.tmp" / "__0_0.distcp").write_bytes(b"x" * 100)
    assert policy.find_checkpoint(str(tmp_path)) is None
    policy.check_paths(config("--save", str(tmp_path)).ckpt)  # nothing there to overwrite
    lines = policy.remove_stale_saves(str(tmp_path))
    assert lines == [f"removed {tmp_path}/iter_0000004.tmp: an incomplete save left by an "
                     f"earlier job"]
    assert os.listdir(tmp_path) == []


# ---- resume policy ---------------------------------------------------------------------------

def state_of(cfg, consumed=16):
    return {**record.make(cfg), "train_state": {"consumed_samples": consumed}}


def problems(saved_args, now_args, consumed=16, world=2, saved_world=2):
    saved = config(*saved_args, world=saved_world)
    now = config(*now_args, "--load", "ckpt", world=world)
    return policy.resume_problems(state_of(saved, consumed), now)


def test_an_unchanged_resume_has_no_problems():
    assert problems([], []) == []


@pytest.mark.parametrize("flags", [["--lr", "2e-3"], ["--min-lr", "1e-5"]])
def test_schedule_changes_follow_megatrons_flags(flags):
    found = problems([], flags)
    assert found[0].startswith(flags[0]) and "--override-opt_param-scheduler" in found[-1]
    for allow in (["--override-opt_param-scheduler"], ["--use-checkpoint-opt_param-scheduler"],
                  ["--finetune"], ["--no-load-scheduler"]):
        assert problems([], flags + allow) == [], allow


def test_extending_a_finished_run_says_what_to_pass():
    found = problems([], ["--train-iters", "6"])
    assert "--lr-decay-iters/--lr-decay-samples: checkpoint 32 samples, now 48 samples" in found[0]
    assert "pass --lr-decay-iters 4 (--lr-decay-samples 32)" in found[-1]
    assert problems([], ["--train-iters", "6", "--lr-decay-iters", "4"]) == []


def test_optimizer_settings_and_run_control_may_change():
    assert problems([], ["--clip-grad", "0.5", "--adam-beta2", "0.95", "--seed", "3",
                         "--micro-batch-size", "1", "--log-interval", "5"]) == []


def test_stage_two_may_unfreeze_but_not_reshape():
    assert problems(["--freeze-lm", "--freeze-vit"], ["--finetune"]) == []
    assert problems(["--freeze-lm", "--freeze-vit"], []) == []
    found = problems([], ["--hidden-size", "32", "--finetune"])
    assert found == ["--hidden-size: checkpoint 64, now 32"]


def test_layout_changes_outside_dp_need_the_optimizer_left_out():
    found = problems([], ["--llm-tp", "2"], world=3)
    assert found[0] == ("--llm-tp: checkpoint 1, now 2 (optimizer state reshards across DP only; "
                        "load weights alone with --no-load-optim)")
    assert found[1].startswith("--llm-expt-tp: checkpoint 1, now 2")  # defaults to --llm-tp
    assert problems([], ["--llm-tp", "2", "--no-load-optim"], world=3) == []
    assert problems(["--llm-dp", "2"], [], saved_world=3) == []  # DP reshards


def test_global_batch_must_divide_the_consumed_samples():
    # Iteration-based schedule lengths are samples = iterations x global batch: they change too.
    new = ["--global-batch-size", "16", "--override-opt_param-scheduler"]
    found = problems([], new, consumed=24)
    assert found == ["--global-batch-size 16 does not divide the checkpoint's 24 consumed samples"]
    assert problems([], new, consumed=32) == []


def test_a_checkpoint_without_optimizer_state_says_to_leave_it_out():
    """Before: the load failed with a 6,000-character list of missing optimizer keys."""
    found = problems(["--save", "ckpt", "--no-save-optim"], [])
    assert found == ["the checkpoint was saved with --no-save-optim and has no optimizer state: "
                     "pass --no-load-optim (a fresh optimizer) or --finetune"]
    assert problems(["--save", "ckpt", "--no-save-optim"], ["--no-load-optim"]) == []


def test_changed_settings_are_listed_for_the_log():
    saved, now = config(), config("--clip-grad", "0.5", "--log-interval", "3")
    assert policy.changed_settings(record.make(saved)["config"], now) == \
        ["optim.clip_grad: 1.0 -> 0.5"]


def test_another_model_provider_is_one_problem():
    saved = config()
    now = config("--model-provider", "nemotron_moe_vlm", "--load", "ckpt")
    assert policy.resume_problems(state_of(saved), now) == \
        ["--model-provider: checkpoint 'mock', now 'nemotron_moe_vlm'"]


# ---- the run record: schema versions and migrations --------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED = ("mock", "nemotron_projector_only")


def frozen(schema):
    return json.loads((FIXTURES / f"run_record_v{schema}.json").read_text())


@pytest.mark.parametrize("schema", sorted(record.MIGRATIONS) + [record.SCHEMA])
@pytest.mark.parametrize("run", RECORDED)
def test_a_checkpoint_of_every_schema_resumes_unchanged(schema, run):
    """A record frozen as each schema's code wrote it (fixtures/run_record_vN.json): read through
    the migrations, the same flags resume it with nothing to refuse and nothing changed."""
    fixture = frozen(schema)[run]
    cfg = parse_config(fixture["flags"], world_size=fixture["world_size"])
    common = record.read(fixture["common"], "ckpt")
    assert common[record.KEY] == record.SCHEMA
    problems = policy.resume_problems({**common, "train_state": {"consumed_samples": 0}}, cfg)
    if run.startswith("nemotron") and schema < 4:
        # schema 4's Nemotron vision side is transformers' (record._from_3): not these weights
        assert problems == ["vision_layout: checkpoint 'ln_post', now 'omni'"]
        return
    assert problems == []
    assert policy.changed_settings(common["config"], cfg) == []
    assert policy.same_layout(common["config"], cfg)


@pytest.mark.parametrize("run", RECORDED)
def test_todays_record_is_the_frozen_one_of_its_schema(run):
    """Fails when a config field is added, renamed or removed without a new schema: then raise
    record.SCHEMA, add a migration from the old one and freeze the new record (record.py)."""
    fixture = frozen(record.SCHEMA)[run]
    cfg = parse_config(fixture["flags"], world_size=fixture["world_size"])
    today = json.loads(json.dumps(record.make(cfg), default=list))
    assert today == fixture["common"], "the run record changed: see record.py"


def test_an_unknown_schema_is_one_line():
    with pytest.raises(CheckpointError, match=r"ckpt: checkpoint schema 1 is not one this trainer "
                                              r"reads \(2, 3, 4, 5, 6, 7\)"):
        record.read({record.KEY: 1, "args": {}}, "ckpt")
    with pytest.raises(CheckpointError, match="schema 99"):
        record.read({record.KEY: 99}, "ckpt")


def test_a_field_missing_from_an_old_record_is_named_not_a_key_error():
    saved = record.make(config())
    del saved["config"]["grid"]["llm_only"]
    found = policy.resume_problems({**saved, "train_state": {"consumed_samples": 0}}, config())
    assert found == ["--llm-only: checkpoint '(not recorded)', now False"]


# ---- flag declarations -------------------------------------------------------------------------

CONTAINERS = {"TrainConfig." + f.name for f in dataclasses.fields(TrainConfig)
              if f.name not in ("model_provider", "data_provider")} | {"NemotronVLMConfig.arch",
                                                                      "LlavaConfig.arch"}
CONFIG_CLASSES = [cls for cls, _ in GROUPS] + [
    TrainConfig, mock_model.MockModelConfig, nemotron.NemotronVLMConfig, nemotron.Architecture,
    llava.LlavaConfig, llava.LlavaArchitecture,
    mock_data.MockDataConfig, energon.EnergonDataConfig, hf.HFDataConfig]


def test_every_field_has_a_resume_class():
    missing = [f"{cls.__name__}.{f.name}" for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)
               if f.metadata.get("resume") not in flags.RESUME_CLASSES
               and f"{cls.__name__}.{f.name}" not in CONTAINERS]
    assert missing == []
    for provider in ("nemotron_moe_vlm", "llava"):
        cfg = config("--model-provider", provider)
        assert None not in {kind for kind, _ in flags.resume_classes(cfg).values()}


@pytest.mark.parametrize("model", sorted(MODEL_PROVIDERS))
@pytest.mark.parametrize("data", sorted(DATA_PROVIDERS))
def test_every_flag_is_declared_once_on_a_field(model, data):
    """Each option the trainer's parser has comes from exactly one field declaration."""
    classes = [cls for cls, _ in GROUPS] + [TrainConfig]
    classes += {"mock": [mock_model.MockModelConfig],
                "nemotron_moe_vlm": [nemotron.NemotronVLMConfig, nemotron.Architecture],
                "llava": [llava.LlavaConfig, llava.LlavaArchitecture]}[model]
    classes += {"mock": [mock_data.MockDataConfig], "energon": [energon.EnergonDataConfig],
                "hf": [hf.HFDataConfig]}[data]
    declared = [fl for cls in classes for _, fl in flags.declarations(cls)]
    names = [name for fl in declared for name in (fl.name, *fl.aliases)]
    assert sorted(n for n in names if names.count(n) > 1) == []
    parser = build_parser(model, data)
    # an action's first option string is its name (then aliases, or --no-X of a boolean pair)
    options = {a.option_strings[0] for a in parser._actions if a.option_strings} - {"-h"}
    assert options == {fl.name for fl in declared}


def test_only_flags_py_calls_add_argument():
    """The trainer, providers and data declare flags on their config fields only."""
    root = Path(__file__).parents[3] / "examples" / "mimo"
    sources = [root / "train_hetero.py", root / "interfaces.py",
               *[p for d in ("training", "model_providers", "data") for p in (root / d).rglob("*.py")]]
    assert [str(p.relative_to(root)) for p in sources if "add_argument(" in p.read_text()] == []


# ---- checksums -------------------------------------------------------------------------------

def test_each_rank_checksums_the_files_it_wrote(tmp_path):
    for name in (".metadata", "metadata.json", "__0_0.distcp", "__1_0.distcp", "__1_1.distcp"):
        (tmp_path / name).write_bytes(name.encode() * 1000)
    assert policy.files_written_by(str(tmp_path), 0) == ["__0_0.distcp", ".metadata",
                                                         "metadata.json"]
    assert policy.files_written_by(str(tmp_path), 1) == ["__1_0.distcp", "__1_1.distcp"]


def test_damaged_files_are_named(tmp_path):
    names = ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]
    for name in names:
        (tmp_path / name).write_bytes(os.urandom(4096))
    manifest = policy.checksum_files(str(tmp_path), names)
    assert policy.damaged_files(str(tmp_path), manifest, names) == []
    with open(tmp_path / "__1_0.distcp", "r+b") as f:  # same size, one byte flipped
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 1]))
    with open(tmp_path / "__2_0.distcp", "ab") as f:
        f.write(b"x")
    (tmp_path / "__0_0.distcp").unlink()
    bad = policy.damaged_files(str(tmp_path), manifest, names)
    assert bad == [f"{tmp_path}/__0_0.distcp is missing",
                   f"{tmp_path}/__1_0.distcp does not match its checksum "
                   f"(crc32 {manifest['__1_0.distcp']['crc32']})",
                   f"{tmp_path}/__2_0.distcp has 4097 bytes, 4096 were written"]
