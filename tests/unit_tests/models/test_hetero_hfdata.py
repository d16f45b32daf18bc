"""The hf data provider on a generated LLaVA dataset, in process: schemas and their errors, chat
tokenization and loss masks, image tokens, splits, lane routing, packing, exact resume, pass
coverage, decode failures, and every input format."""

import io
import json
import shutil
import sys

import pytest
import torch

from tests.unit_tests.models.dist_harness import ROOT

SCRIPTS = ROOT / "examples" / "mimo" / "scripts"
SPEC_ARGS = dict(vocab_size=256, image_token_id=255, image_tokens=4, image_shape=(3, 16, 16))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """64 samples (6 text-only chats), PNGs beside the JSON, caption pairs as parquet with the
    images embedded, and a tokenizer; made in process (a second interpreter costs seconds)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import make_llava_dataset
    finally:
        sys.path.remove(str(SCRIPTS))
    root = tmp_path_factory.mktemp("hf") / "llava"
    make_llava_dataset.build(str(root), samples=64, seed=3, image_size=24, vocab_size=256,
                             blank_images=False, text_fraction=0.1, captions="parquet")
    return root


def config(root, path=None, **kw):
    from examples.mimo.data import hf

    return hf.HFDataConfig(**{"data_path": str(path or root / "llava.json"),
                              "tokenizer_model": str(root / "tokenizer"),
                              "data_cache_path": str(root.parent / "cache"), "split": "3,1", **kw})


def rank(*, is_llm=True, dp_rank=0, llm_dp=1, encoder_dp=1, mbs=2, seed=1, with_images=True):
    from examples.mimo.interfaces import RankData

    return RankData(is_llm=is_llm, dp_rank=dp_rank, llm_dp=llm_dp, encoder_dp=encoder_dp,
                    micro_batch_size=mbs, num_microbatches=1, seq_length=96, seed=seed,
                    with_images=with_images)


def iterator(cfg, r, split="train", **spec):
    from examples.mimo.data import hf
    from examples.mimo.interfaces import DataSpec

    return hf.build_iterator(cfg, spec=DataSpec(**{**SPEC_ARGS, **spec}), rank=r,
                             to_model=lambda b: b, split=split)


def encoder(root, with_images=True, **spec):
    from examples.mimo.data.energon import load_tokenizer
    from examples.mimo.data.task_encoder import MimoTaskEncoder
    from examples.mimo.interfaces import DataSpec

    return MimoTaskEncoder(tokenizer=load_tokenizer(str(root / "tokenizer")),
                           spec=DataSpec(**{**SPEC_ARGS, **spec}), seq_length=96,
                           with_images=with_images)


def keys(batch):
    return [k for row in batch["keys"] for k in row]


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            same(a[k], b[k])
        else:
            assert a[k] == b[k], k


def cat(parts):
    present = [p for p in parts if p is not None]
    return torch.cat(present) if present else None


def check_fails(root, args, match):
    from examples.mimo.training.hetero.config import parse_config

    with pytest.raises(ValueError, match=match) as err:
        parse_config(["--llm-dp", "2", "--global-batch-size", "8", "--train-iters", "2",
                      "--data-provider", "hf", "--tokenizer-model", str(root / "tokenizer"),
                      "--data-cache-path", str(root.parent / "cache"), *args], world_size=3)
    assert "\n" not in str(err.value)


# ---- schemas and bad input ----------------------------------------------------------------------

def test_the_schema_comes_from_the_columns_and_bad_input_is_one_line(llava, tmp_path):
    from examples.mimo.data.hf_source import CAPTIONS, CONVERSATIONS, TEXT, detect_schema

    assert detect_schema(["id", "image", "conversations"], "p").kind == CONVERSATIONS
    assert detect_schema(["conversations"], "p").image is None  # text-only chats
    assert detect_schema(["image", "caption"], "p").kind == CAPTIONS
    assert detect_schema(["image", "text"], "p").text == "text"
    assert detect_schema(["text", "id"], "p").kind == TEXT
    (tmp_path / "img.jsonl").write_text('{"image": "a.png", "label": 3}\n')
    (tmp_path / "odd.jsonl").write_text('{"question": "q", "label": 3}\n')
    (tmp_path / "notes.txt").write_text("text\n")
    for path, match in (
            (tmp_path / "img.jsonl", r"img.jsonl: caption pairs need a column 'caption' or "
                                     r"'text'; its columns are \['image', 'label'\]$"),
            (tmp_path / "odd.jsonl", r"odd.jsonl: no known schema in its columns \['question', "
                                     r"'label'\]: 'conversations'"),
            (tmp_path / "nope", r"--data-path .*nope: no such file or folder$"),
            (tmp_path / "notes.txt", r"notes.txt: neither a save_to_disk folder .* nor "
                                     r"\.parquet/\.json/\.jsonl files$")):
        check_fails(llava, ["--data-path", str(path)], match)
    (tmp_path / "bad.json").write_text("[{")
    check_fails(llava, ["--data-path", str(tmp_path / "bad.json")],
                r"bad.json: the datasets library cannot read it: DatasetGenerationError: .* <- "
                r"\w+: \S")
    good = ["--data-path", str(llava / "llava.json")]
    check_fails(llava, good + ["--split", "0,1"], r"--split 0,1: give 1 to 3 non-negative weights")
    check_fails(llava, good + ["--packing-buffer-size", "1"],
                r"--packing-buffer-size 1 must be >= 2")
    check_fails(llava, good + ["--encoder-dp", "2", "--llm-dp", "1"],
                r"--data-provider hf cannot feed .*--encoder-dp <= --llm-dp")
    check_fails(llava, good + ["--vocab-size", "300"], r"the tokenizer's <image> is 255, the model "
                                                       r"provider's is 299")


def test_flags_parse_into_the_config_and_notes_give_the_splits(llava):
    from examples.mimo.data import hf
    from examples.mimo.training.hetero.config import parse_config

    cfg = parse_config(["--train-iters", "2", "--data-provider", "hf", "--data-path",
                        str(llava / "llava.json"), "--tokenizer-model", str(llava / "tokenizer"),
                        "--split", "3,1", "--packing-buffer-size", "4", "--data-cache-path",
                        str(llava.parent / "cache")], world_size=2).data
    assert cfg == config(llava, packing_buffer_size=4)
    assert hf.notes(cfg, llm_dp=1) == [
        f"data: {llava / 'llava.json'}: LLaVA conversations, 48 train and 16 validation samples "
        f"(--split 3,1, rows drawn by --seed); each pass reads every train sample once"]


# ---- tokenization -------------------------------------------------------------------------------

def test_the_loss_covers_the_assistant_turns_only(llava):
    enc = encoder(llava)
    chat = [{"role": "user", "content": "<image>\nwhat colour are the shapes?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "how many shapes are there?"},
            {"role": "assistant", "content": "two"}]
    s = enc.encode_conversation(key="k", restore_key=(), messages=chat,
                                images=[torch.rand(3, 24, 24)])
    tok = enc.tok
    answers = [tok.text_to_ids(a) + [tok.eos_id] for a in ("red", "two")]
    assert s.labels[s.loss_mask.bool()].tolist() == answers[0] + answers[1]
    # the spans are where the answers are, not merely the same tokens elsewhere
    ids = s.input_ids.tolist() + [s.labels[-1].item()]
    assistant = tok._tok.tokenizer.convert_tokens_to_ids("<|assistant|>")
    starts = [i + 1 for i, t in enumerate(ids) if t == assistant]
    on = {i for i, m in enumerate([0.0] + s.loss_mask.tolist()) if m}
    assert on == {i for st, a in zip(starts, answers) for i in range(st, st + len(a))}
    # the template's own prompt opening agrees with the chat's
    assert tok.chat_ids(chat[:2])[0][:len(tok.chat_prompt(chat[0]["content"]))] == \
        tok.chat_prompt(chat[0]["content"])


def test_each_image_marker_becomes_its_images_tokens(llava):
    chat = [{"role": "user", "content": "<image> and <image>: same colour?"},
            {"role": "assistant", "content": "yes"}]
    images = [torch.rand(3, 24, 24), torch.rand(3, 24, 48)]
    s = encoder(llava).encode_conversation(key="k", restore_key=(), messages=chat, images=images)
    assert (s.input_ids == 255).sum() == 2 * 4 and len(s.images) == 2
    assert s.images[1].shape == (3, 16, 16)  # resized to the provider's shape
    # dynamic resolution: each image its own count (2x2 patches of 4 px per token)
    dyn = encoder(llava, dynamic_resolution=True, patch_dim=4, max_image_side=32, image_tokens=4)
    d = dyn.encode_conversation(key="k", restore_key=(), messages=chat, images=images)
    assert d.image_sizes == [(16, 16), (8, 16)] and (d.input_ids == 255).sum() == 4 + 2
    # no marker: LLaVA's rule puts it first; a count that does not match is the sample's error
    plain = [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": "x"}]
    one = encoder(llava).encode_conversation(key="k", restore_key=(), messages=plain,
                                             images=images[:1])
    assert one.input_ids[1:5].tolist() == [255] * 4
    with pytest.raises(ValueError, match="2 <image> markers for 1 image"):
        encoder(llava).encode_conversation(key="k", restore_key=(), messages=chat,
                                           images=images[:1])
    # --llm-only: no images, and no markers left in the text
    text = encoder(llava, with_images=False).encode_conversation(key="k", restore_key=(),
                                                               messages=chat, images=images)
    assert 255 not in text.input_ids.tolist() and text.images == []


# ---- splits, routing, resume, coverage ----------------------------------------------------------

def test_split_weights_draw_rows_by_the_seed(llava):
    from examples.mimo.data.hf_source import split_sizes, splits

    def rows(seed, weights=(3, 1)):
        _, parts = splits(str(llava / "llava.json"), str(llava.parent / "cache"), weights, seed)
        return [parts[s][1].tolist() for s in ("train", "val")]

    train, val = rows(1)
    assert (len(train), len(val)) == (48, 16) and sorted(train + val) == list(range(64))
    assert rows(1) == [train, val] and rows(2) != [train, val]
    assert split_sizes(1000, (969, 30, 1)) == (969, 30) and split_sizes(10, (1,)) == (10, 0)


def test_an_encoder_rank_reads_exactly_its_lanes_llm_ranks(llava):
    """Encoder DP1 feeding LLM DP2, and DP2 feeding DP4, packed and not: the encoder's merged
    micro-batch is its lanes' micro-batches, lane after lane, as their own LLM ranks read them."""
    for packing in (None, 4):
        cfg = config(llava, packing_buffer_size=packing)
        for enc_dp, llm_dp in ((1, 2), (2, 4)):
            k = llm_dp // enc_dp
            llms = [iterator(cfg, rank(dp_rank=i, llm_dp=llm_dp, encoder_dp=enc_dp))
                    for i in range(llm_dp)]
            lanes = [[it.next_batch() for _ in range(5)] for it in llms]
            assert len({json.dumps([b["keys"] for b in lane]) for lane in lanes}) == llm_dp
            for e in range(enc_dp):
                it = iterator(cfg, rank(is_llm=False, dp_rank=e, llm_dp=llm_dp, encoder_dp=enc_dp))
                for j in range(5):
                    got = it.next_batch()
                    assert keys(got) == [key for lane in lanes[e * k:(e + 1) * k]
                                         for key in keys(lane[j])]
                    mine = lanes[e * k:(e + 1) * k]
                    for name in ("input_ids", "loss_mask", "images"):
                        assert torch.equal(got[name], cat([lane[j][name] for lane in mine])), name


def test_a_pass_reads_every_train_sample_once(llava):
    from examples.mimo.data.hf_source import splits

    _, parts = splits(str(llava / "llava.json"), str(llava.parent / "cache"), (3, 1), 1)
    train = {str(r) for r in parts["train"][1]}
    # 48 samples: 2 lanes x 2 per micro-batch x 12
    its = [iterator(config(llava), rank(dp_rank=i, llm_dp=2)) for i in range(2)]
    seen = [k for _ in range(12) for it in its for k in keys(it.next_batch())]
    assert sorted(seen) == sorted(train)
    # the next pass: every sample again, in another order
    again = [k for _ in range(12) for it in its for k in keys(it.next_batch())]
    assert sorted(again) == sorted(train) and again != seen
    # packed (buffers of 4 divide the pass): the rows of the first 12 buffers hold the pass
    it = iterator(config(llava, packing_buffer_size=4), rank())
    packed = []
    while len(packed) < 48:
        packed += keys(it.next_batch())
    assert sorted(packed[:48]) == sorted(train)


def test_the_state_resumes_at_the_next_sample(llava):
    for packing, r in ((4, rank(is_llm=False, llm_dp=2)), (None, rank(dp_rank=1, llm_dp=2))):
        cfg = config(llava, packing_buffer_size=packing)
        it = iterator(cfg, r)
        for _ in range(7):  # into the second pass, rows waiting in the lanes' queues
            next(it)
        state = it.state_dict()
        assert packing is None or any(lane["rows"] for lane in state["lanes"])
        straight = [next(it) for _ in range(4)]
        resumed = iterator(cfg, r)
        resumed.load_state_dict(state)
        for a, b in zip(straight, [next(resumed) for _ in range(4)]):
            same(a, b)
        # plain data: the checkpoint's per-rank objects are loaded with weights_only
        buf = io.BytesIO()
        torch.save(state, buf)
        assert torch.load(io.BytesIO(buf.getvalue()), weights_only=True) == state


def test_another_layout_restarts_with_new_passes_and_the_rng_is_left_alone(llava):
    from examples.mimo.interfaces import DataStateMismatch

    cfg = config(llava, packing_buffer_size=4)
    it = iterator(cfg, rank())
    before = torch.get_rng_state()
    next(it)
    state = it.state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    other = iterator(cfg, rank(mbs=4))
    with pytest.raises(DataStateMismatch, match=r"cannot restore this rank's \(micro_batch_size "
                                                r"2 -> 4\)$"):
        other.load_state_dict(state)
    assert "ordered by seed 1 + iteration 30" in other.restart(iteration=30)
    after = other.state_dict()
    assert after["order_seed"] == 31 and after["lanes"][0]["cursor"] == 0
    # a state written after such a restart keeps its order when it is loaded
    next(other)
    saved, follow = other.state_dict(), next(other)
    fresh = iterator(cfg, rank(mbs=4))
    fresh.load_state_dict(saved)
    same(next(fresh), follow)


def test_validation_reads_its_split_in_order_pass_after_pass(llava):
    from examples.mimo.data.hf_source import splits

    _, parts = splits(str(llava / "llava.json"), str(llava.parent / "cache"), (3, 1), 1)
    val = [str(r) for r in parts["val"][1]]
    it = iterator(config(llava), rank(mbs=4), split="val")
    assert [k for _ in range(8) for k in keys(next(it))] == val + val
    with pytest.raises(ValueError, match="its val split has no samples"):
        iterator(config(llava, split="1"), rank(), split="val")


# ---- failures and formats -----------------------------------------------------------------------

def test_a_corrupt_or_missing_image_is_skipped_and_counted_or_fails(llava, tmp_path, capfd):
    ds = tmp_path / "ds"
    shutil.copytree(llava / "images", ds / "images")
    shutil.copy(llava / "llava.json", ds / "llava.json")
    records = json.loads((ds / "llava.json").read_text())
    with_image = [i for i, r in enumerate(records) if "image" in r]
    (ds / records[with_image[0]]["image"]).write_bytes(b"not a png" * 10)
    (ds / records[with_image[1]]["image"]).unlink()
    bad = {str(with_image[0]), str(with_image[1])}
    it = iterator(config(llava, ds / "llava.json", split="1"), rank(mbs=4))
    seen = [k for _ in range(17) for k in keys(next(it))]  # a pass and a bit
    assert not bad & set(seen) and len(set(seen)) == 62 and it.dropped >= 2
    out = capfd.readouterr().out
    assert out.count("data: skipping a sample that failed") == it.dropped
    assert "UnidentifiedImageError" in out and "FileNotFoundError" in out
    it = iterator(config(llava, ds / "llava.json", split="1", data_error_policy="fail"),
                  rank(mbs=4))
    with pytest.raises(RuntimeError, match=r"a sample failed \((UnidentifiedImageError|"
                                           r"FileNotFoundError).* in .*llava.json row "
                                           r"\d+ \(--data-error-policy fail\)"):
        for _ in range(17):
            next(it)


def test_save_to_disk_parquet_json_and_jsonl_are_read(llava, tmp_path):
    from datasets import Dataset, DatasetDict, load_dataset

    records = json.loads((llava / "llava.json").read_text())
    pairs = [{"image": r["image"], "caption": r["conversations"][1]["value"]}
             for r in records if "image" in r]
    lines = "".join(json.dumps(p) + "\n" for p in pairs)
    (tmp_path / "pairs.jsonl").write_text(lines)
    (tmp_path / "parts").mkdir()
    half = len(pairs) // 2
    for name, part in (("a", pairs[:half]), ("b", pairs[half:])):
        (tmp_path / "parts" / f"{name}.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in part))
    embedded = load_dataset("parquet", data_files=str(llava / "captions.parquet"),
                            cache_dir=str(tmp_path / "c"))["train"]
    DatasetDict(train=embedded.select(range(40)), validation=embedded.select(range(40, 48))) \
        .save_to_disk(str(tmp_path / "dict"))
    Dataset.from_list([{"text": "one plus two is three."}] * 8).save_to_disk(str(tmp_path / "text"))
    cases = {llava / "llava.json": 64, llava / "captions.parquet": len(pairs),
             tmp_path / "pairs.jsonl": len(pairs), tmp_path / "parts": len(pairs),
             tmp_path / "dict": 40, tmp_path / "text": 8}
    for path, n in cases.items():
        folder = {"image_folder": str(llava)} if path.parent == tmp_path else {}
        it = iterator(config(llava, path, split="1", **folder), rank(mbs=4))
        seen = [k for _ in range(-(-n // 4)) for k in keys(next(it))]
        assert len(set(seen)) == n and it.dropped == 0, path
    val = iterator(config(llava, tmp_path / "dict"), rank(mbs=4), split="val")
    assert keys(next(val)) == ["0", "1", "2", "3"]  # its own validation split, not --split


def test_blank_images_keep_the_texts(llava, tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import make_llava_dataset
    finally:
        sys.path.remove(str(SCRIPTS))
    make_llava_dataset.build(str(tmp_path / "blank"), samples=64, seed=3, image_size=24,
                             vocab_size=256, blank_images=True, text_fraction=0.1, captions="none")
    assert (tmp_path / "blank" / "llava.json").read_text() == (llava / "llava.json").read_text()
    from examples.mimo.data.hf_source import decode_image

    image = decode_image("images/000000.png", str(tmp_path / "blank"))
    assert image.shape == (3, 24, 24) and image.eq(128 / 255).all()


# ---- training through the launcher --------------------------------------------------------------

def test_an_encoder_and_an_llm_rank_train_and_evaluate_on_it(llava, tmp_path):
    """The one launch (CI time): packed rows, images and text-only chats, the val split. A resume
    through a checkpoint continues bit-exactly (docs/data.md); in process above, the state."""
    from tests.unit_tests.models.dist_harness import train

    metrics = train(2, tmp_path, ["--global-batch-size", "4", "--micro-batch-size", "2",
                                  "--seq-length", "96", "--train-iters", "2", "--eval-interval",
                                  "2", "--eval-iters", "1", "--data-provider", "hf", "--data-path",
                                  str(llava / "llava.json"), "--tokenizer-model",
                                  str(llava / "tokenizer"), "--split", "3,1",
                                  "--packing-buffer-size", "4", "--data-cache-path",
                                  str(llava.parent / "cache")])
    steps = [m for m in metrics if "lm_loss" in m]
    assert [m["iteration"] for m in steps] == [1, 2]
    assert all(m["loss_tokens"] > 0 and m["images_per_iteration"] > 0
               and m["lm_loss"] == m["lm_loss"] for m in steps)
    assert [m["validation_tokens"] > 0 for m in metrics if "validation_lm_loss" in m] == [True]
