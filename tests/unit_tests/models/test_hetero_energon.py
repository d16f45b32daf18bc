"""The energon data provider on a generated dataset: task encoding, lane routing, merging,
packing, resumable loader state, bad input and failures through the launcher."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from examples.mimo.data.merge import ENCODER_INPUTS, LANE_BATCH, merge
from tests.unit_tests.models.dist_harness import ROOT, free_port, job_env

SCRIPT = ROOT / "examples" / "mimo" / "scripts" / "make_sample_energon_dataset.py"
ENV = job_env()


@pytest.fixture
def data(energon_data):
    return energon_data


def worker(module, *args, timeout=240):
    proc = subprocess.run([sys.executable, "-m", f"tests.unit_tests.models.workers.{module}",
                           *map(str, args)], cwd=ROOT, env=dict(ENV, PORT=str(free_port())),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def launch(nproc, args, timeout=300):
    cmd = [sys.executable, "-m", "examples.mimo.launch", "--standalone", "--nproc-per-node",
           str(nproc), "--", "--device", "cpu", "--distributed-timeout-minutes", "1", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def energon_args(root, *extra):
    return ["--data-provider", "energon", "--data-path", str(root / "blend.yaml"),
            "--tokenizer-model", str(root / "tokenizer"), *extra]


# ---- task encoding and merging (in-process) ---------------------------------------------------

def test_vqa_loss_mask_covers_exactly_the_answer_tokens(data):
    from megatron.energon import VQASample

    from examples.mimo.data.task_encoder import MimoTaskEncoder
    from examples.mimo.data.tokenizer import Tokenizer
    from examples.mimo.interfaces import DataSpec

    tok = Tokenizer(str(data / "tokenizer"))
    spec = DataSpec(vocab_size=256, image_token_id=255, image_tokens=16, image_shape=(3, 16, 16))
    encoder = MimoTaskEncoder(tokenizer=tok, spec=spec, seq_length=64, with_images=True)
    sample = VQASample(__key__="q", __restore_key__=(), __subflavors__=None, __sources__=None,
                       image=torch.rand(3, 32, 32), context="how many shapes are there?",
                       answers=["two"], answer_weights=None)
    enc = encoder.encode_sample(sample)
    answer = tok.text_to_ids("two") + [tok.eos_id]
    targets = enc.labels[enc.loss_mask.bool()].tolist()
    assert targets == answer
    # every masked-in label is an answer token, and those are the last labels of the sample
    assert enc.loss_mask[-len(answer):].tolist() == [1.0] * len(answer)
    assert enc.loss_mask[:-len(answer)].sum() == 0
    assert (enc.input_ids == 255).sum() == 16 and enc.images[0].shape == (3, 16, 16)
    batch = encoder.batch([enc])
    assert batch["loss_mask"][0, enc.loss_mask.numel():].sum() == 0  # padding never counts


def test_dynamic_resolution_keeps_the_aspect_ratio_under_the_token_budget(data):
    from megatron.energon import CaptioningSample

    from examples.mimo.data.task_encoder import MimoTaskEncoder, dynamic_size
    from examples.mimo.data.tokenizer import Tokenizer
    from examples.mimo.interfaces import DataSpec

    # budget: the fixed 32x32 area (4 tokens of 2x2 patches of 8 px); sides up to 64 px
    spec = DataSpec(vocab_size=256, image_token_id=255, image_tokens=4, image_shape=(3, 32, 32),
                    dynamic_resolution=True, patch_dim=8, max_image_side=64)
    assert dynamic_size((32, 128), spec) == (16, 64)  # 1:4 kept, 512 px <= 1024 px
    assert dynamic_size((16, 16), spec) == (16, 16)  # never scaled up
    assert dynamic_size((20, 200), spec) == (16, 64)  # the longer side capped
    assert dynamic_size((3, 3), spec) == (16, 16)  # at least one token
    encoder = MimoTaskEncoder(tokenizer=Tokenizer(str(data / "tokenizer")), spec=spec,
                              seq_length=64, with_images=True)

    def caption(key, h, w):
        return CaptioningSample(__key__=key, __restore_key__=(), __subflavors__=None,
                                __sources__=None, image=torch.rand(3, h, w), caption="a red square")

    wide, square = encoder.encode_sample(caption("w", 32, 128)), encoder.encode_sample(caption("s", 32, 32))
    assert wide.image_sizes == [(16, 64)] and (wide.input_ids == 255).sum() == 1 * 4
    assert square.image_sizes == [(32, 32)] and (square.input_ids == 255).sum() == 2 * 2
    assert wide.images[0].shape == (2 * 8, 3 * 8 * 8)  # 2x8 patches of 3*8*8 values
    batch = encoder.batch([wide, square])
    assert batch["images"].shape == (16 + 16, 192) and batch["imgs_sizes"].tolist() == [[16, 64], [32, 32]]
    assert torch.equal(batch["images"][16:], square.images[0])  # image after image, in order


def test_merge_follows_the_schema_not_the_shapes():
    from megatron.core.packed_seq_params import PackedSeqParams

    lane = lambda v: {"input_ids": torch.full((2, 4), v), "labels": torch.full((2, 4), v),  # noqa: E731
                      "loss_mask": torch.ones(2, 4), "images": torch.full((2, 3, 2, 2), float(v)),
                      "seqlens": [[4], [4]], "keys": [[f"a{v}"], [f"b{v}"]], "__restore_key__": (v,)}
    merged = merge([lane(0), lane(1)], LANE_BATCH)  # equal shapes: rows, never another axis
    assert merged["input_ids"].shape == (4, 4) and merged["input_ids"][2:].eq(1).all()
    assert merged["images"].shape == (4, 3, 2, 2) and merged["keys"] == [["a0"], ["b0"], ["a1"], ["b1"]]
    no_image = dict(lane(2), images=None)
    assert merge([lane(0), no_image], LANE_BATCH)["images"].shape == (2, 3, 2, 2)

    def packed(lens, d=8):
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        return {"images": torch.randn(sum(lens), d), "imgs_sizes": torch.tensor([[16, 16]] * len(lens)),
                "packed_seq_params": PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                     max_seqlen_q=max(lens), max_seqlen_kv=max(lens))}
    a, b = packed([3, 5]), packed([4, 2, 6])
    m = merge([a, b], ENCODER_INPUTS)
    assert m["images"].shape == (20, 8) and m["imgs_sizes"].shape == (5, 2)
    assert m["packed_seq_params"].cu_seqlens_q.tolist() == [0, 3, 8, 12, 14, 20]
    assert m["packed_seq_params"].max_seqlen_kv == 6
    with pytest.raises(TypeError, match="no rule for pixel_values"):
        merge([{"pixel_values": torch.ones(1)}] * 2, ENCODER_INPUTS)
    with pytest.raises(TypeError, match="imgs_sizes must be a tensor"):
        merge([dict(a, imgs_sizes=[[16, 16]]), b], ENCODER_INPUTS)
    with pytest.raises(TypeError, match="disagree on their keys"):
        merge([a, {"images": torch.ones(1, 8)}], ENCODER_INPUTS)


# ---- loaders (a process of their own) ---------------------------------------------------------

def test_routed_loaders_give_each_lane_its_own_loaders_samples(data, tmp_path):
    worker("energon_worker", "routing", data, tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result) == {"1,2,1", "1,4,2", "2,4,1", "1,8,2"}
    for config, seen in result.items():
        assert seen["routed"] == seen["per_lane"], config
        lanes = list(seen["routed"].values())
        assert len(lanes) == int(config.split(",")[1])
        # lanes are different streams (a routing that fed every lane the same would pass above
        # only if the per-lane loaders were wrong in the same way)
        assert len({json.dumps(v) for v in lanes}) == len(lanes), config


def test_a_pass_over_the_split_reads_every_sample_once(data, tmp_path):
    """Before: with the default --shuffle-buffer-size 100, LLM DP3 and 3 workers, a pass read
    313 of 384 samples (energon fills the buffer across the repeat, and the buffer exceeded each
    worker's ~43 samples). With the default now 0, every sample comes once per pass where the
    loaders' shares are equal; where they are not (192 samples over 3 lanes x 3 workers), each
    loader is off by at most a micro-batch of 2 at the pass's end."""
    worker("energon_worker", "coverage", data, tmp_path / "c.json")
    result = json.loads((tmp_path / "c.json").read_text())
    for layout in ("1,3,0", "2,2,0", "3,1,0"):
        assert result[layout] == {"reads": 192, "distinct": 192}, layout
    assert result["3,3,0"]["distinct"] >= 192 - 9 * 2 // 2
    assert result["3,3,100"]["distinct"] < 0.8 * 192  # what the old default did


def test_loader_state_resumes_at_the_next_sample(data, tmp_path):
    worker("energon_worker", "resume", data, tmp_path / "r.json")
    for packing, r in json.loads((tmp_path / "r.json").read_text()).items():
        assert r["queued"] > 0, packing  # batches waiting in lane queues were in the state
        # re-creating them must not leave shard files open for the loader's workers to inherit
        # (found on CI: a worker read a caption sample's png, the other worker moved the offset)
        assert r["open_before_fork"] == [], packing
        assert r["resumed"] == r["straight"], packing


def split_keys(root, split):
    """Sample keys of one split, from energon's split.yaml and the shards' member names."""
    import yaml
    from braceexpand import braceexpand

    found = set()
    for sub in ("captions", "vqa", "text"):
        parts = yaml.safe_load((root / sub / ".nv-meta" / "split.yaml").read_text())["split_parts"]
        for shard in (name for pattern in parts[split] for name in braceexpand(pattern)):
            with tarfile.open(root / sub / shard) as t:
                found |= {m.name.split(".")[0] for m in t.getmembers()}
    return found


def test_val_split_is_routed_like_training_and_goes_on_pass_after_pass(data, tmp_path):
    worker("energon_worker", "val", data, tmp_path / "r.json")
    r = json.loads((tmp_path / "r.json").read_text())
    val, train = split_keys(data, "val"), split_keys(data, "train")
    enc, llm0, llm1 = r["encoder"], r["llm0"], r["llm1"]
    seen = {k for batch in enc for row in batch for k in row}
    assert seen == val and not seen & train  # 40 micro-batches cover the whole val split
    # the encoder's merged micro-batch holds lane 0's rows, then lane 1's: what each LLM rank
    # reads, also across the end of a pass
    assert enc == [a + b for a, b in zip(llm0, llm1)]
    assert r["encoder_per_lane"] == enc
    for lane in (llm0, llm1):
        period = lane.index(lane[0], 1)  # the second pass starts over, unshuffled
        assert lane[period:2 * period] == lane[:period][:len(lane) - period]


def test_packed_and_unpacked_samples_give_the_same_loss(data):
    """Two rows of packed samples as one THD sequence (the layout training uses) vs one sample
    per row; the GPU counterpart with Mamba layers is in test_hetero_gpu_packing.py."""
    out = json.loads(worker("packing_worker", data).stdout.strip().splitlines()[-1])
    assert min(out["rows"]) >= 3 and out["keys"][0] == out["keys"][1]
    assert out["tokens"][0] == out["tokens"][1] > 0
    assert out["packed"] == out["unpacked"], out  # bit for bit on CPU in fp32


def test_llm_only_trains_on_packed_rows(data, tmp_path):
    """The colocated forward (--llm-only) takes packing_kwargs, which a dense mask never reached."""
    from tests.unit_tests.models.dist_harness import train

    metrics = train(1, tmp_path, ["--llm-only", "--llm-dp", "1", "--global-batch-size", "4",
                                  "--micro-batch-size", "2", "--seq-length", "64",
                                  "--train-iters", "2", "--num-workers", "0",
                                  "--packing-buffer-size", "4", *energon_args(data)])
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all(m["loss_tokens"] > 0 and m["lm_loss"] == m["lm_loss"] for m in metrics)


# ---- bad input --------------------------------------------------------------------------------

def check_fails(args, match):
    from examples.mimo.training.hetero.config import parse_config

    with pytest.raises(ValueError, match=match):
        parse_config(["--llm-dp", "2", "--global-batch-size", "8", "--train-iters", "2", *args],
                     world_size=3)


def test_bad_energon_input_is_named_before_anything_starts(data, tmp_path):
    check_fails(["--data-provider", "energon", "--data-path", str(tmp_path / "nope"),
                 "--tokenizer-model", str(data / "tokenizer")], r"--data-path .*nope: no such file")
    (tmp_path / "plain").mkdir()
    small = tmp_path / "small"  # one shard: the 80/20 split leaves the train split empty
    subprocess.run([sys.executable, str(SCRIPT), str(small), "--samples", "16"], check=True,
                   capture_output=True, timeout=120, env=ENV)
    check_fails(["--data-provider", "energon", "--data-path", str(small / "blend.yaml"),
                 "--tokenizer-model", str(data / "tokenizer")],
                r"energon cannot read it: No shards found in split part 'train'")
    check_fails(["--data-provider", "energon", "--data-path", str(tmp_path / "plain"),
                 "--tokenizer-model", str(data / "tokenizer")], r"not a prepared energon dataset")
    blend = tmp_path / "blend.yaml"
    blend.write_text((data / "blend.yaml").read_text().replace("path: vqa", "path: missing_vqa"))
    for sub in ("captions", "text"):
        os.symlink(data / sub, tmp_path / sub)
    check_fails(["--data-provider", "energon", "--data-path", str(blend), "--tokenizer-model",
                 str(data / "tokenizer")], r"blend entry 'missing_vqa' is not a prepared")
    check_fails(energon_args(data)[:-1] + [str(tmp_path / "tok")], r"--tokenizer-model .*tok: no such")
    check_fails(energon_args(data, "--vocab-size", "300"),
                r"image token id: the tokenizer's <image> is 255, the model provider's is 299")
    check_fails(energon_args(data, "--encoder-dp", "2", "--llm-dp", "1"), r"--encoder-dp <= --llm-dp")
    check_fails(energon_args(data, "--num-workers", "-1"), r"--num-workers -1 must be >= 0")
    check_fails(energon_args(data, "--packing-buffer-size", "1"), r"--packing-buffer-size 1 must be >= 2")
    check_fails(energon_args(data, "--shuffle-buffer-size", "-3"), r"--shuffle-buffer-size -3 must be >= 0")


def corrupt_dataset(data, tmp_path):
    """The caption dataset with one sample's PNG replaced by garbage."""
    ds = tmp_path / "corrupt"
    shutil.copytree(data / "captions", ds, ignore=shutil.ignore_patterns(".nv-meta"))
    shard = ds / "shard_0000.tar"
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(shard, "w") as t:
        for m, raw in members:
            if m.name == "cap000001.png":
                raw = b"not a png" * 10
                m.size = len(raw)
            t.addfile(m, __import__("io").BytesIO(raw))
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from make_sample_energon_dataset import prepare
    finally:
        sys.path.pop(0)
    prepare(str(ds), "CaptioningSample", {"image": "png", "caption": "txt"})
    return ds


def test_a_corrupt_sample_is_skipped_and_counted_or_fails(data, tmp_path, capfd):
    from examples.mimo.data import energon
    from examples.mimo.interfaces import DataSpec, RankData

    ds = corrupt_dataset(data, tmp_path)
    spec = DataSpec(vocab_size=256, image_token_id=255, image_tokens=16, image_shape=(3, 16, 16))
    rank = RankData(is_llm=True, dp_rank=0, llm_dp=1, encoder_dp=1, micro_batch_size=4,
                    num_microbatches=1, seq_length=64, seed=1, with_images=True)
    for policy in ("skip", "fail"):
        cfg = energon.EnergonDataConfig(
            data_path=str(ds), tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(data / "tokenizer"), num_workers=0, packing_buffer_size=None,
            shuffle_buffer_size=0, max_samples_per_sequence=None, data_error_policy=policy,
            lane_routing=True)
        it = energon.build_iterator(cfg, spec=spec, rank=rank, to_model=lambda b: b)
        if policy == "skip":
            keys = [k for _ in range(70) for row in next(it)["keys"] for k in row]
            # 280 samples: more than one pass over the train split, so it came up again
            assert "cap000001" not in keys and it.dropped >= 1
            assert capfd.readouterr().out.count("data: skipping a sample that failed") == it.dropped
        else:
            with pytest.raises(RuntimeError, match=r"DecodingError\) in .*shard_0000.tar: "
                                                   r"cap000001.png.*--data-error-policy fail"):
                for _ in range(70):
                    next(it)


def test_reading_data_leaves_the_training_rng_alone(data):
    """A resume starts the loader at another point of the global RNG stream than the straight run
    did; found when a Nemotron resume (RADIO draws its position-embedding crops from that stream)
    matched the straight run only to 1e-7."""
    from examples.mimo.data import energon
    from examples.mimo.interfaces import DataSpec, RankData

    spec = DataSpec(vocab_size=256, image_token_id=255, image_tokens=16, image_shape=(3, 16, 16))
    rank = RankData(is_llm=True, dp_rank=0, llm_dp=1, encoder_dp=1, micro_batch_size=2,
                    num_microbatches=1, seq_length=64, seed=1, with_images=True)
    cfg = energon.EnergonDataConfig(
        data_path=str(data / "blend.yaml"), tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(data / "tokenizer"), num_workers=0, packing_buffer_size=4,
        shuffle_buffer_size=8, max_samples_per_sequence=None, data_error_policy="fail",
        lane_routing=True)
    it = energon.build_iterator(cfg, spec=spec, rank=rank, to_model=lambda b: b)
    before = torch.get_rng_state()
    for _ in range(3):
        next(it)
    state = it.state_dict()
    resumed = energon.build_iterator(cfg, spec=spec, rank=rank, to_model=lambda b: b)
    resumed.load_state_dict(state)
    next(resumed)
    assert torch.equal(torch.get_rng_state(), before)


# ---- training through the launcher ------------------------------------------------------------

# Training on the blend through the launcher is in docs/results.md (not here: CI time).


def test_dynamic_resolution_trains_on_images_of_three_aspect_ratios(tmp_path):
    """Nemotron tiny-cpu, encoder DP1 feeding LLM DP2 (two lanes merged: packed patches and
    imgs_sizes), packing, images 32x32, 64x32 and 16x32 at their own sizes; with evaluation."""
    from tests.unit_tests.models.dist_harness import train

    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "bad"), "--aspect-ratios",
                          "1,0"], capture_output=True, text=True, timeout=60, env=ENV)
    assert bad.returncode == 2 and "--aspect-ratios 1,0 must be positive" in bad.stderr
    ds = tmp_path / "ds"
    subprocess.run([sys.executable, str(SCRIPT), str(ds), "--samples", "128", "--aspect-ratios",
                    "1,2,0.5"], check=True, capture_output=True, timeout=120, env=ENV)
    metrics = train(3, tmp_path, ["--model-provider", "nemotron_moe_vlm", "--model-preset",
                                  "tiny-cpu", "--dynamic-resolution", "--llm-dp", "2",
                                  "--global-batch-size", "8", "--micro-batch-size", "2",
                                  "--seq-length", "64", "--train-iters", "3", "--num-workers", "1",
                                  "--packing-buffer-size", "4", "--eval-interval", "2",
                                  "--eval-iters", "1", *energon_args(ds)])
    steps = [m for m in metrics if "validation_lm_loss" not in m]
    assert [m["iteration"] for m in steps] == [1, 2, 3]
    assert all(m["loss_tokens"] > 0 and m["lm_loss"] == m["lm_loss"] for m in steps)
    # validation on the dataset's val split, through the same routing and packing
    evals = [m for m in metrics if "validation_lm_loss" in m]
    assert [m["iteration"] for m in evals] == [2, 3]
    assert all(0 < m["validation_lm_loss"] < 20 and m["validation_tokens"] > 0 for m in evals)


def test_a_dying_loader_worker_ends_every_rank(data, tmp_path):
    """A dataset whose own sample loader kills its worker process (as a native crash would)."""
    ds = tmp_path / "text"
    shutil.copytree(data / "text", ds)
    (ds / ".nv-meta" / "sample_loader.py").write_text(
        "import os\n\ndef sample_loader(raw):\n    if raw['__key__'] == 'txt000005':\n"
        "        os._exit(9)\n    return {'text': raw['txt'].decode()}\n\n"
        "def part_filter(part):\n    return True\n")
    meta = (ds / ".nv-meta" / "dataset.yaml").read_text()
    (ds / ".nv-meta" / "dataset.yaml").write_text(
        meta.split("field_map")[0] + "sample_loader: sample_loader.py:sample_loader\n"
        "part_filter: sample_loader.py:part_filter\n")
    proc = launch(2, ["--data-provider", "energon", "--data-path", str(ds), "--tokenizer-model",
                      str(data / "tokenizer"), "--train-iters", "40",
                      "--global-batch-size", "8", "--seq-length", "64", "--num-workers", "1",
                      "--shuffle-buffer-size", "0"], timeout=200)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank ") and "worker" in last.lower(), last
