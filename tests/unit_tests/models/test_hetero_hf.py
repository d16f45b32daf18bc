"""Hugging Face weights in and out for the Nemotron VLM, on CPU/gloo. The HF models are
transformers' own (tiny, random, hf_models.py); each is imported through the real launcher into a
layout, and the first iteration's loss (computed with the imported weights) must equal
transformers' loss on the same batch. Export gives back the same tensors, and after training a
folder whose loss transformers computes as ours. Bad folders are one line, in-process."""

import json

import pytest
import torch

from examples.mimo.data import mock as mock_data
from examples.mimo.model_providers import nemotron_moe_vlm as nemotron
from examples.mimo.model_providers.hf_checkpoint import Reader, coverage_problems
from examples.mimo.scripts import export_hf
from examples.mimo.training.hetero.config import parse_config
from tests.unit_tests.models import hf_models
from tests.unit_tests.models.dist_harness import run_train

FLAGS = ["--model-provider", "nemotron_moe_vlm", "--global-batch-size", "4",
         "--micro-batch-size", "2", "--seq-length", "64"]
# fp32 on both sides; what differs is the order of reductions (TP, the experts' sums)
RTOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_models.omni(tmp_path_factory.mktemp("hf") / "omni")


@pytest.fixture(scope="module")
def reference(folder):
    return hf_models.load_omni(folder)


def transformers_loss(model, flags, *, world, first):
    """transformers' loss on the global batch of samples first .. first + batch - 1."""
    cfg = parse_config(["--device", "cpu", "--train-iters", "1", *flags], world_size=world)
    spec = nemotron.data_spec(cfg.model)
    samples = hf_models.mock_batch(cfg, spec, first=first)
    assert any(s["image"] is not None for s in samples)
    return hf_models.omni_loss(model, samples, patch_dim=cfg.model.arch.patch_dim,
                               image_token_id=spec.image_token_id)


LAYOUTS = {
    "one rank, colocated": (1, ["--colocated"]),
    # hetero 1+1: test_export_gives_back_the_imported_tensors_and_the_trained_model
    "LLM TP2 with sequence parallel and EP2": (3, ["--llm-tp", "2", "--sequence-parallel",
                                                   "--llm-ep", "2", "--llm-expt-tp", "1"]),
    "LLM PP2": (3, ["--llm-pp", "2"]),
    "encoder DP2 fanning out to LLM DP4": (6, ["--encoder-dp", "2", "--llm-dp", "4",
                                               "--global-batch-size", "8"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_imported_vlm_computes_transformers_loss(layout, folder, reference, tmp_path):
    nproc, extra = LAYOUTS[layout]
    flags = [*FLAGS, *extra, "--load-from-hf", folder, "--train-iters", "1"]
    rows, proc = run_train(nproc, tmp_path, flags)
    assert f"from {folder} (Hugging Face)" in proc.stdout
    theirs = transformers_loss(reference, flags, world=nproc, first=0)
    assert rows[0]["lm_loss"] == pytest.approx(theirs, rel=RTOL)


def test_the_language_model_alone_from_a_nemotron_h_folder(tmp_path):
    """--llm-only from transformers' NemotronHForCausalLM folder (its own names, no prefix)."""
    from transformers import NemotronHForCausalLM

    folder = hf_models.nemotron_h(tmp_path / "nemotron_h", seed=1, max_shard_size="200KB")
    assert (tmp_path / "nemotron_h" / "model.safetensors.index.json").exists()  # sharded
    flags = [*FLAGS, "--llm-only", "--load-language-from", folder, "--train-iters", "1"]
    rows, _ = run_train(1, tmp_path, flags)
    cfg = parse_config(["--device", "cpu", *flags], world_size=1)
    spec = nemotron.data_spec(cfg.model)
    samples = [mock_data.make_sample(i, cfg=cfg.data, spec=spec, seq_length=64,
                                     seed=cfg.runtime.seed, with_images=False) for i in range(4)]
    model = NemotronHForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 experts_implementation="eager").eval()
    assert rows[0]["lm_loss"] == pytest.approx(hf_models.llm_loss(model, samples), rel=RTOL)


def tensors(path):
    reader = Reader(str(path))
    return {n: reader.read(n, (slice(None),)) for n in reader.names()}


def test_export_gives_back_the_imported_tensors_and_the_trained_model(folder, reference,
                                                                     tmp_path, capsys):
    # Hetero 1+1, imported and saved with nothing trained (an LR too small to move fp32 weights,
    # routing biases held): its loss is transformers', and the export is the source, tensor for
    # tensor (but those left out on purpose).
    held = ["--lr", "1e-30", "--min-lr", "0", "--moe-router-bias-update-rate", "0"]
    flags = [*FLAGS, *held, "--load-from-hf", folder, "--train-iters", "1"]
    rows, _ = run_train(2, tmp_path, [*flags, "--save", str(tmp_path / "a")], "a")
    assert rows[0]["lm_loss"] == pytest.approx(
        transformers_loss(reference, flags, world=2, first=0), rel=RTOL)
    assert export_hf.main(["--load", str(tmp_path / "a"), "--out", str(tmp_path / "a.hf")]) == 0
    source, exported = tensors(folder), tensors(tmp_path / "a.hf")
    assert sorted(set(source) - set(exported)) == sorted(
        n for n in source if n.endswith((".lambda1", "summary_idxs", "video_embedder.weight")))
    assert [n for n in exported if not torch.equal(exported[n], source[n])] == []
    # a second export into the same folder is refused, before anything is read or written
    assert export_hf.main(["--load", str(tmp_path / "a"), "--out", str(tmp_path / "a.hf")]) == 2
    assert f"--out {tmp_path}/a.hf exists and is not empty" in capsys.readouterr().err
    again = tensors(tmp_path / "a.hf")
    assert not (tmp_path / "a.hf.tmp").exists()
    assert sorted(again) == sorted(exported) and all(torch.equal(again[n], exported[n])
                                                     for n in exported)

    # Four real steps, saved after the third: the fourth step's loss is computed with the saved
    # weights, and transformers computes it with their export.
    ckpt = str(tmp_path / "b")
    rows, _ = run_train(2, tmp_path, [*FLAGS, "--load-from-hf", folder, "--train-iters", "4",
                                      "--save", ckpt, "--save-interval", "3"], "b")
    assert export_hf.main(["--load", ckpt, "--iteration", "3", "--out",
                           str(tmp_path / "b.hf")]) == 0
    theirs = transformers_loss(hf_models.load_omni(tmp_path / "b.hf"), FLAGS, world=2,
                               first=3 * 4)
    assert rows[3]["iteration"] == 4
    assert rows[3]["lm_loss"] == pytest.approx(theirs, rel=RTOL)
    assert rows[3]["lm_loss"] < rows[0]["lm_loss"]
    with open(tmp_path / "b.hf" / "config.json") as f:
        assert json.load(f)["model_type"] == "nemotron_h_omni"


def test_export_never_overwrites(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("kept")
    assert export_hf.main(["--load", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


# ---- the shape comes from the folder; bad folders are one line ---------------------------------

def config(*flags, world=2):
    return parse_config(["--device", "cpu", "--train-iters", "1", *FLAGS, *flags],
                        world_size=world)


def test_the_folder_gives_the_shape(folder):
    a = config("--load-from-hf", folder, "--model-preset", "nemotron-20l").model.arch
    assert (a.hybrid_layer_pattern, a.hidden_size, a.num_experts, a.vision_num_layers,
            a.class_token_len, a.img_h) == ("*E*E", 64, 4, 2, 2, 32)


@pytest.mark.parametrize("flags, message", [
    (["--hidden-size", "32"], "--hidden-size 32 contradicts the Hugging Face config.json (64)"),
    (["--image-token-id", "3"], "--image-token-id 3 contradicts the Hugging Face config.json (255)"),
    (["--llm-only", "--llm-dp", "2"], "with --llm-only use --load-language-from"),
    (["--load-language-from", "x"], "drop --load-language-from and --load-vision-from"),
])
def test_a_contradiction_is_one_line(folder, flags, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config("--load-from-hf", folder, *flags)


def test_a_bad_folder_is_one_line(tmp_path, folder):
    with pytest.raises(ValueError, match=f"--load-from-hf {tmp_path}/none is not a directory"):
        config("--load-from-hf", str(tmp_path / "none"))
    with pytest.raises(ValueError, match="has no config.json"):
        config("--load-from-hf", str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not readable JSON"):
        config("--load-from-hf", str(tmp_path))
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text('{"model_type": "radio"}')
    (vit / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=f"--load-language-from {vit}: config.json has "
                                         f"model_type 'radio', not 'nemotron_h'"):
        config("--load-language-from", str(vit))
    with pytest.raises(ValueError, match="--model-provider mock does not import Hugging Face"):
        parse_config(["--train-iters", "1", "--load-from-hf", folder], world_size=2)


def test_coverage_names_what_is_missing_and_what_would_be_left(folder):
    cfg = config("--load-from-hf", folder)
    parts = nemotron.hf_parts(cfg.model, load_from_hf=folder, language_from=None,
                              vision_from=None)
    recipes, shapes, unused = hf_models.coverage_inputs(parts, folder)
    assert coverage_problems(recipes, recipes, shapes, unused) == []
    gone = "language_model.backbone.layers.1.mixer.gate.weight"
    found = coverage_problems(recipes, recipes, {k: v for k, v in shapes.items() if k != gone},
                              unused)
    assert found == [f"the folder lacks ['{gone}']"]
    extra = {**shapes, "language_model.backbone.layers.9.norm.weight": (64,)}
    assert coverage_problems(recipes, recipes, extra, unused) == [
        "1 tensors of the folder would not be used: "
        "['language_model.backbone.layers.9.norm.weight']"]
    assert coverage_problems(recipes, set(recipes) | {"decoder.extra"}, shapes, unused) == [
        "no Hugging Face tensor fills ['decoder.extra']"]


def test_a_radio_folder_maps_onto_the_vision_branch(tmp_path):
    """A standalone RADIO folder (transformers' names, no prefix) for --load-vision-from: every
    tensor is used or left out on purpose, every key of the ViT filled."""
    folder = hf_models.radio(tmp_path / "radio")
    cfg = config("--load-vision-from", folder)
    assert (cfg.model.arch.vision_hidden_size, cfg.model.arch.class_token_len) == (32, 2)
    part = nemotron.hf_parts(cfg.model, load_from_hf=None, language_from=None,
                             vision_from=folder)["images"]
    reader = Reader(folder)
    shapes = {n: reader.shape(n) for n in reader.names()}
    assert coverage_problems(part.recipes, part.recipes, shapes, part.unused) == []
    assert "input_projections.0.norm.weight" not in part.recipes  # the projector is not in it


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_mamba_layers_map_onto_transformers_tensors(impl, tmp_path):
    """Mamba layers cannot run here (their kernels need CUDA: test_hetero_gpu_hf runs them); the
    mapping is checked row by row: in_proj's z, x, B, C, dt and conv1d's x, B, C parts tile
    transformers' tensors exactly, with the norm's name of each layer spec."""
    from examples.mimo.model_providers import nemotron_hf

    kinds = ["linear_attention", "moe", "full_attention", "mlp"]
    folder = hf_models.nemotron_h(tmp_path / "hybrid", layers_block_type=kinds)
    arch = config("--llm-only", "--llm-dp", "2", "--load-language-from", folder).model.arch
    assert arch.hybrid_layer_pattern == "ME*-"
    recipes = nemotron_hf.language_recipes(arch, prefix="", transformer_impl=impl)
    reader = Reader(folder)
    shapes = {n: reader.shape(n) for n in reader.names()}
    assert coverage_problems(recipes, recipes, shapes, lambda n: False) == []
    norm = "mixer.in_proj.layer_norm_weight" if impl == "transformer_engine" else "norm.weight"
    assert recipes[f"decoder.layers.0.{norm}"].parts == (("backbone.layers.0.norm.weight", 0, 64),)
    # d_inner 8 x 16 = 128, B and C 2 groups x 16 = 32, 8 heads
    assert [recipes[f"decoder.layers.0.mixer.in_proj.weight.{p}"].parts[0][1:] for p in
            ("z", "x", "B", "C", "dt")] == [(0, 128), (128, 128), (256, 32), (288, 32), (320, 8)]


def test_a_shard_reads_only_its_own_rows():
    """What a TP rank's slice of a fused QKV asks of the folder: its query groups' rows of q, k
    and v, and its own columns, nothing else."""
    from examples.mimo.model_providers import nemotron_hf

    asked = []

    class Recording:
        def read(self, name, index):
            asked.append((name, index[0].start, index[0].stop, index[1].start, index[1].stop))
            return torch.zeros(index[0].stop - index[0].start, index[1].stop - index[1].start)

    arch = nemotron.PRESETS["tiny-cpu"]  # 4 heads of 16 in 2 query groups: 3 x 32 rows each
    recipe = nemotron_hf.language_recipes(arch, prefix="", transformer_impl="local")[
        "decoder.layers.0.self_attention.linear_qkv.weight"]
    out = recipe.read(Recording(), [slice(64, 128), slice(0, 64)])  # TP rank 1 of 2
    assert out.shape == (64, 64)
    mixer = "backbone.layers.0.mixer."
    assert asked == [(f"{mixer}q_proj.weight", 32, 64, 0, 64), (f"{mixer}k_proj.weight", 16, 32, 0, 64),
                     (f"{mixer}v_proj.weight", 16, 32, 0, 64)]


def test_the_audio_branch_is_named_when_left_out():
    from examples.mimo.model_providers import nemotron_hf

    src = nemotron_hf.Sources(language="d", vision="d", projector=True,
                              configs=(("d", {"model_type": "nemotron_h_omni",
                                              "audio_config": {"hidden_size": 8}}),))
    assert nemotron_hf.audio_note(src) == ("d: its audio branch (sound_encoder.*, "
                                           "sound_projection.*) is not imported: this model has "
                                           "no audio input")
    assert nemotron_hf.unused(src, "d")("sound_encoder.encoder.layers.0.w")


def test_a_layer_scale_other_than_one_is_refused(folder, tmp_path):
    """transformers applies RADIO's layer scales as identities; one that is not 1 would be
    silently dropped."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "scaled"
    shutil.copytree(folder, copy)
    weights = load_file(str(copy / "model.safetensors"))
    name = "vision_model.radio_model.model.blocks.0.layer_scale1.lambda1"
    weights[name] = weights[name] * 2
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="RADIO layer scales other than 1 are not supported"):
        config("--load-from-hf", str(copy))


def test_a_damaged_weights_file_is_one_line(folder, tmp_path):
    """Found: a safetensors file that is not one (or a broken index) escaped as safetensors' own
    error, a traceback from the configuration check, instead of one line naming the file."""
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    (copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"{copy}/model.safetensors is not a readable safetensors "
                                         f"file"):
        config("--load-from-hf", str(copy))
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        config("--llm-only", "--llm-dp", "2", "--load-language-from", str(copy))  # no vision read
    (copy / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a readable index"):
        config("--load-from-hf", str(copy))
