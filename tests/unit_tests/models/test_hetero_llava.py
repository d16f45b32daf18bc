"""The LLaVA provider (model_providers/llava.py, llava_hf.py) against transformers, on CPU/gloo.

The Hugging Face models are transformers' own (tiny, random, hf_models.py): Llama + CLIP (llama3
RoPE scaling, untied), Qwen3 + SigLIP (QK-norm, linear RoPE scaling, tied, "full" features, an
image size no multiple of the patch), and a Qwen2 language model alone (QKV biases, tied). Each
is imported as the trainer imports it into a layout, and the logits of one global batch must
equal transformers' on the same tokens and pixels; three jobs hold every layout. A short
training run imports, saves, trains; its exports are the source again (bit for bit) and, after
training, the model transformers computes as ours. Bad folders and flags are one line, before
any process group.
"""

import dataclasses
import json
import shutil

import pytest
import torch

from examples.mimo.model_providers import llava, llava_hf
from examples.mimo.model_providers.hf_checkpoint import (Assembler, Experts, Reader,
                                                         coverage_problems)
from examples.mimo.scripts import export_hf
from examples.mimo.training.hetero.config import parse_config
from tests.unit_tests.models import hf_models
from tests.unit_tests.models.dist_harness import run_train, torchrun

FLAGS = ["--model-provider", "llava", "--micro-batch-size", "2"]
# fp32 on both sides. One rank, DP, PP and the bridge compute what transformers computes (found
# bit-identical); TP adds partial products in another order (found <= 4e-6 on logits of ~4).
ATOL = 2e-5

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {
        "llama_clip": hf_models.llava(
            root / "llama_clip", text=dict(model_type="llama", rope_parameters=LLAMA3,
                                           max_position_embeddings=16384),
            vision=dict(model_type="clip_vision_model")),
        "qwen3_siglip": hf_models.llava(
            root / "qwen3_siglip", seed=1, tie_word_embeddings=True,
            vision_feature_select_strategy="full",
            text=dict(model_type="qwen3", tie_word_embeddings=True,
                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
            # 36 is no multiple of the patch (8): transformers' convolution drops the rest, as
            # the tower of LLaVA-OneVision does (SigLIP so400m: 384 px in patches of 14)
            vision=dict(model_type="siglip_vision_model", image_size=36)),
        "qwen2": hf_models.causal_lm(root / "qwen2", seed=2, model_type="qwen2",
                                     tie_word_embeddings=True),
    }


def config(*flags, world=2):
    return parse_config(["--device", "cpu", "--train-iters", "1", *FLAGS, *flags],
                        world_size=world)


def samples_of(cfg):
    return hf_models.mock_batch(cfg, llava.data_spec(cfg.model))


def load_hf(folder):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    with open(f"{folder}/config.json") as f:
        kind = json.load(f)["model_type"]
    cls = LlavaForConditionalGeneration if kind == "llava" else AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


# ---- a short training run: import, save, train; its exports ------------------------------------

# where the checkpoints are written: the layout of most parts, each of them sharded
TRAINED = ["--encoder-tp", "2", "--llm-tp", "2", "--llm-pp", "2"]


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    """The Qwen3 + SigLIP folder into encoder TP2 + LLM TP2 x PP2 (tied embeddings across the
    stages), 3 iterations saved after each, the first at learning rate 0 (warm-up): iteration
    1's checkpoint holds the imported weights."""
    tmp = tmp_path_factory.mktemp("trained")
    flags = ["--global-batch-size", "4", "--load-from-hf", folders["qwen3_siglip"],
             "--lr-warmup-iters", "1", "--train-iters", "3", *TRAINED]
    rows, _ = run_train(6, tmp, [*FLAGS, *flags, "--save", str(tmp / "ckpt"),
                                 "--save-interval", "1"])
    for it in (1, 2):
        assert export_hf.main(["--load", str(tmp / "ckpt"), "--iteration", str(it),
                               "--out", str(tmp / f"hf{it}")]) == 0
    return {"rows": rows, "flags": flags, "imported": str(tmp / "hf1"), "trained": str(tmp / "hf2")}


def tensors(path):
    reader = Reader(str(path))
    return {n: reader.read(n, (slice(None),)) for n in reader.names()}


def test_export_of_the_imported_model_is_the_source(folders, trained):
    source, exported = tensors(folders["qwen3_siglip"]), tensors(trained["imported"])
    # the tower's last layer feeds nothing (vision_feature_layer -2) and is not held, nor is
    # SigLIP's pooling head (LLaVA reads neither)
    dropped = {n for n in source if n.startswith(("vision_tower.encoder.layers.2.",
                                                  "vision_tower.head."))}
    assert dropped and set(exported) == set(source) - dropped
    post = {"vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"}
    assert [n for n in exported if n not in post and not torch.equal(exported[n], source[n])] == []
    assert torch.equal(exported["vision_tower.post_layernorm.weight"], torch.ones(32))  # identity
    with open(f"{trained['imported']}/config.json") as f:
        written = json.load(f)
    assert (written["model_type"], written["vision_feature_layer"],
            written["vision_config"]["num_hidden_layers"]) == ("llava", -1, 2)


def test_training_moves_the_loss_and_its_export_is_what_transformers_computes(folders, trained):
    rows, flags = trained["rows"], trained["flags"]
    batch = samples_of(replace_batch(config(*flags, world=6), 12))
    source, after = load_hf(folders["qwen3_siglip"]), load_hf(trained["trained"])
    # iterations 1 and 2 run the imported weights (iteration 1's learning rate is 0); iteration 3
    # the weights saved after iteration 2, which trained on its batch
    for it, model in ((1, source), (2, source), (3, after)):
        assert rows[it - 1]["lm_loss"] == pytest.approx(
            hf_models.llava_loss(model, batch[4 * (it - 1):4 * it]), rel=1e-5)
    assert hf_models.llava_loss(after, batch[4:8]) < rows[1]["lm_loss"]


def replace_batch(cfg, samples):
    return dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch,
                                                              global_batch_size=samples))


# ---- logits of every layout against transformers' ----------------------------------------------

# case: (world size, folder, flags); one job per world size
LAYOUTS = {
    "one rank: llama + clip": (1, "llama_clip", ["--colocated", "--global-batch-size", "4"]),
    "one rank: qwen3 + siglip": (1, "qwen3_siglip", ["--colocated", "--global-batch-size", "4"]),
    "one rank: qwen2 alone": (1, "qwen2", ["--llm-only", "--global-batch-size", "4"]),
    "hetero 1+1: llama + clip": (2, "llama_clip", ["--global-batch-size", "4"]),
    "hetero 1+1: qwen3 + siglip": (2, "qwen3_siglip", ["--global-batch-size", "4"]),
    "hetero 1+1: qwen3 + siglip exported (from TP2 x PP2) and imported again": (
        2, "imported", ["--global-batch-size", "4"]),
    "encoder DP2 fanning out to LLM DP4": (6, "llama_clip", [
        "--encoder-dp", "2", "--llm-dp", "4", "--global-batch-size", "8"]),
    "LLM TP2 with sequence parallel, encoder TP2": (6, "qwen3_siglip", [
        "--encoder-tp", "2", "--llm-tp", "2", "--sequence-parallel", "--llm-dp", "2",
        "--global-batch-size", "8"]),
    "LLM PP2 x TP2, tied embeddings": (6, "qwen3_siglip", [
        "--encoder-tp", "2", "--llm-tp", "2", "--llm-pp", "2", "--global-batch-size", "4"]),
    "LLM PP2, encoder DP2": (6, "llama_clip", [
        "--encoder-dp", "2", "--llm-pp", "2", "--llm-dp", "2", "--global-batch-size", "8"]),
}


def case_flags(layout, sources):
    world, source, flags = LAYOUTS[layout]
    load = "--load-language-from" if "--llm-only" in flags else "--load-from-hf"
    return world, sources[source], [*flags, load, sources[source]]


@pytest.fixture(scope="module")
def logits(folders, trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("logits")
    sources = {**folders, "imported": trained["imported"]}
    names = {layout: f"case{i}" for i, layout in enumerate(LAYOUTS)}
    for world in sorted({w for w, _, _ in LAYOUTS.values()}):
        args = [str(out)]
        for layout in LAYOUTS:
            w, _, flags = case_flags(layout, sources)
            if w == world:
                args += [names[layout], *FLAGS, *flags, "::"]
        torchrun(world, "tests.unit_tests.models.workers.llava_worker", args[:-1], timeout=240)
    found = {}
    for layout, name in names.items():
        found[layout] = [row for f in sorted(out.glob(f"{name}.rank*.pt"))
                         for ids, got in torch.load(f) for row in zip(ids, got)]
    return found, sources


@pytest.fixture(scope="module")
def reference(logits):
    """transformers' logits of (folder, sample index), computed once each."""
    _, sources = logits
    models, cache = {}, {}

    def get(source, samples, index):
        if (source, index) not in cache:
            if source not in models:
                models[source] = load_hf(sources[source])
            cache[source, index] = hf_models.llava_logits(models[source], [samples[index]])[0]
        return cache[source, index]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_imported_logits_equal_transformers(layout, logits, reference):
    found, sources = logits
    world, _, flags = case_flags(layout, sources)
    samples = samples_of(config(*flags, world=world))
    ids = [tuple(s["input_ids"].tolist()) for s in samples]
    assert len(set(ids)) == len(ids)  # each row is found by its tokens
    seen, worst = [], 0.0
    for row_ids, row in found[layout]:
        index = ids.index(tuple(row_ids.tolist()))
        seen.append(index)
        worst = max(worst, (row - reference(LAYOUTS[layout][1], samples, index)).abs().max().item())
    assert sorted(seen) == list(range(len(samples)))  # the whole global batch, once
    assert any(s["image"] is not None for s in samples) or "--llm-only" in flags
    print(f"{layout}: max |logit difference| {worst:.2e}")
    assert worst <= ATOL


def test_an_export_imports_again_bit_for_bit(logits):
    found, _ = logits
    first = dict((tuple(i.tolist()), x) for i, x in found["hetero 1+1: qwen3 + siglip"])
    again = dict((tuple(i.tolist()), x) for i, x in found[
        "hetero 1+1: qwen3 + siglip exported (from TP2 x PP2) and imported again"])
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


# ---- shapes from config.json; in-process mappings ----------------------------------------------

def test_the_folders_give_the_shape(folders):
    cfg = config("--load-from-hf", folders["llama_clip"], "--model-preset", "llava-1.5-7b")
    a = cfg.model.arch
    assert (a.hidden_size, a.num_query_groups, a.rope_scaling, a.rope_scaling_factor,
            a.rotary_base, a.untie_embeddings_and_output_weights, a.vision_model_type,
            a.vision_num_layers, a.vision_feature_layer) == (64, 2, "llama3", 8.0, 5e5, True,
                                                              "clip", 3, -2)
    spec = llava.data_spec(cfg.model)
    assert (spec.image_token_id, spec.image_tokens, spec.image_shape) == (255, 16, (3, 32, 32))
    assert llava.facts(cfg.model).encoder_num_layers == 2  # the last layer is not built
    q = config("--load-from-hf", folders["qwen3_siglip"]).model
    assert (q.arch.qk_layernorm, q.arch.untie_embeddings_and_output_weights, q.arch.rope_scaling,
            q.image_tokens, llava.data_spec(q).pixel_mean, llava.data_spec(q).image_shape) == \
        (True, False, "linear", 16, (0.5, 0.5, 0.5), (3, 36, 36))
    q2 = config("--llm-only", "--llm-dp", "2", "--load-language-from", folders["qwen2"]).model.arch
    assert (q2.add_qkv_bias, q2.qk_layernorm, q2.untie_embeddings_and_output_weights) == \
        (True, False, False)


def our_tensor(recipe, reader):
    """One of our tensors, whole, as the import reads it."""
    if isinstance(recipe, Experts):
        return torch.stack([our_tensor(r, reader) for r in recipe.experts])
    if isinstance(recipe, llava_hf.Reshaped):
        return recipe.read(reader, [slice(None)] * len(recipe.shape))
    return recipe.read(reader, [slice(0, sum(count for _, _, count in recipe.parts))])


@pytest.mark.parametrize("source, flags", [
    ("llama_clip", ["--load-from-hf"]), ("qwen3_siglip", ["--load-from-hf"]),
    ("qwen2", ["--llm-only", "--llm-dp", "2", "--load-language-from"])])
def test_import_then_export_gives_the_folder_back_and_facts_count_it(folders, source, flags):
    """The recipes both ways, in-process: each of our tensors read whole and written back is the
    folder's tensor; config.json as transformers completes it reads back as the same model; the
    parameters the import fills are those facts() counts."""
    folder = folders[source]
    cfg = config(*flags, folder)
    parts = llava.hf_parts(cfg.model, load_from_hf=cfg.ckpt.load_from_hf,
                           language_from=cfg.ckpt.load_language_from, vision_from=None)
    record = json.loads(json.dumps(dataclasses.asdict(cfg.model)))  # as a checkpoint stores it
    branches, hf_config = llava.hf_export(record, llm_only=cfg.grid.llm_only)
    reader, out, numel = Reader(folder), Assembler(), 0
    for branch, recipes in branches.items():
        assert set(recipes) == set(parts[branch].recipes)
        for key, recipe in recipes.items():
            tensor = our_tensor(parts[branch].recipes[key], reader)
            numel += tensor.numel()
            recipe.write(tensor, out)
    written = {n: out.tensor(n) for n in sorted(out.blocks)}
    source_tensors = tensors(folder)
    post = ("post_layernorm.weight", "post_layernorm.bias")
    assert [n for n in written if not n.endswith(post)
            and not torch.equal(written[n], source_tensors[n])] == []
    unused = [n for n in source_tensors if n not in written]
    assert all(any(p.unused(n) for p in parts.values()) for n in unused)
    facts = llava.facts(cfg.model)
    assert numel == facts.llm_params + (0 if cfg.grid.llm_only else facts.encoder_params)
    full = export_hf._full_config(hf_config)
    again, _ = llava_hf.architecture(llava_hf.Sources(language="x", vision=None if cfg.grid.llm_only
                                                      else "x", configs=(("x", full),)))
    want = dataclasses.asdict(cfg.model.arch)
    if not cfg.grid.llm_only:
        want.update(vision_num_layers=llava_hf.vision_layers(cfg.model.arch),
                    vision_feature_layer=-1)
    assert {k: want[k] for k in again} == again


def renamed(folder, tmp_path, mapping, extra=()):
    """A copy of ``folder`` whose tensor names have their prefixes replaced (another saver's
    layout), with ``extra`` buffers added."""
    from safetensors.torch import save_file

    copy = tmp_path / "renamed"
    copy.mkdir()
    shutil.copy(f"{folder}/config.json", copy / "config.json")
    out = {}
    for name, tensor in tensors(folder).items():
        for old, new in mapping:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = tensor
    out.update({n: torch.arange(4) for n in extra})
    save_file(out, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return str(copy)


@pytest.mark.parametrize("mapping", [
    # the Hub's llava-hf folders (transformers 4)
    [("vision_tower.", "vision_tower.vision_model.")],
    # transformers 5's own module names
    [("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
     ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.",
                                                "model.multi_modal_projector.")]])
def test_other_savers_names_map_onto_the_model(folders, tmp_path, mapping):
    folder = renamed(folders["llama_clip"], tmp_path, mapping,
                     extra=["vision_tower.vision_model.embeddings.position_ids"])
    cfg = config("--load-from-hf", folder)
    parts = llava.hf_parts(cfg.model, load_from_hf=folder, language_from=None, vision_from=None)
    recipes, shapes, unused = hf_models.coverage_inputs(parts, folder)
    assert coverage_problems(recipes, recipes, shapes, unused) == []


def test_coverage_names_what_is_missing_and_what_would_be_left(folders):
    folder = folders["llama_clip"]
    cfg = config("--load-from-hf", folder)
    parts = llava.hf_parts(cfg.model, load_from_hf=folder, language_from=None, vision_from=None)
    recipes, shapes, unused = hf_models.coverage_inputs(parts, folder)
    gone = "language_model.model.layers.1.mlp.up_proj.weight"
    assert coverage_problems(recipes, recipes, {k: v for k, v in shapes.items() if k != gone},
                             unused) == [f"the folder lacks ['{gone}']"]
    extra = {**shapes, "language_model.model.layers.9.input_layernorm.weight": (64,)}
    assert coverage_problems(recipes, recipes, extra, unused) == [
        "1 tensors of the folder would not be used: "
        "['language_model.model.layers.9.input_layernorm.weight']"]
    assert coverage_problems(recipes, set(recipes) | {"decoder.extra"}, shapes, unused) == [
        "no Hugging Face tensor fills ['decoder.extra']"]


def test_a_clip_model_folder_gives_its_vision_half(tmp_path):
    """--load-vision-from a whole CLIPModel: its tower is imported, its text half left out."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                eos_token_id=1)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=hf_models.LLAVA_VISION,
                                 projection_dim=8))
    model.save_pretrained(str(tmp_path / "clip"))
    folder = str(tmp_path / "clip")
    cfg = config("--load-vision-from", folder)
    assert (cfg.model.arch.vision_model_type, cfg.model.arch.vision_num_layers) == ("clip", 3)
    part = llava.hf_parts(cfg.model, load_from_hf=None, language_from=None,
                          vision_from=folder)["images"]
    reader = Reader(folder)
    shapes = {n: reader.shape(n) for n in reader.names()}
    assert coverage_problems(part.recipes, part.recipes, shapes, part.unused) == []
    assert not any(k.startswith("input_projections") for k in part.recipes)  # no projector there


def edited(folder, tmp_path, edit):
    """A copy of ``folder`` whose config.json ``edit`` changed (the weights linked)."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for f in ("model.safetensors",):
        (copy / f).symlink_to(f"{folder}/{f}")
    with open(f"{folder}/config.json") as f:
        cfg = json.load(f)
    edit(cfg)
    (copy / "config.json").write_text(json.dumps(cfg))
    return str(copy)


def _text(key, value):
    def edit(cfg):
        cfg["text_config"][key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_text("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "RoPE scaling 'yarn' is not supported (megatron-core's GPTModel scales RoPE only as "
     "'linear' or 'llama3')"),
    (_text("rope_parameters", {**LLAMA3, "low_freq_factor": 2.0}),
     "llama3 RoPE scaling with low_freq_factor 2.0 is not supported"),
    (_text("model_type", "mistral"), "the language model's model_type 'mistral' is not one of"),
    (_text("attention_bias", True), "attention_bias True is not supported"),
    (lambda cfg: cfg.update(vision_feature_layer=[-2, -1]),
     "vision_feature_layer [-2, -1]: only one layer's output"),
    (lambda cfg: cfg["vision_config"].update(hidden_act="relu"),
     "hidden_act 'relu' is not supported"),
])
def test_what_the_provider_cannot_represent_is_one_line(folders, tmp_path, edit, message):
    folder = edited(folders["llama_clip"], tmp_path, edit)
    with pytest.raises(ValueError) as err:
        config("--load-from-hf", folder)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (["--hidden-size", "32"], "--hidden-size 32 contradicts the Hugging Face config.json (64)"),
    (["--vision-feature-layer", "-1"],
     "--vision-feature-layer -1 contradicts the Hugging Face config.json (-2)"),
    (["--qk-layernorm"], "--qk-layernorm True contradicts the Hugging Face config.json (False)"),
    (["--image-token-id", "3"],
     "--image-token-id 3 contradicts the Hugging Face config.json (255)"),
    (["--load-language-from", "x"], "drop --load-language-from and --load-vision-from"),
])
def test_a_flag_contradicting_the_folder_is_one_line(folders, flags, message):
    with pytest.raises(ValueError) as err:
        config("--load-from-hf", folders["llama_clip"], *flags)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (["--load-from-hf", "{qwen2}"], "config.json has model_type 'qwen2', not one of ['llava']"),
    (["--load-vision-from", "{qwen2}"], "config.json has model_type 'qwen2', not one of ['llava', "
                                        "'clip', 'siglip'"),
    (["--vision-feature-layer", "-5"], "--vision-feature-layer -5 must pick one of the tower's 3 "
                                       "layers"),
    (["--add-qkv-bias", "--qk-layernorm"], "has no Hugging Face counterpart"),
    (["--vision-model-type", "siglip", "--img-h", "8", "--img-w", "8"],
     "--vision-feature-select-strategy default leaves no image token of 1"),
    (["--patch-dim", "40"], "--patch-dim 40 must not exceed --img-h 32"),
])
def test_a_bad_folder_or_flag_is_one_line(folders, flags, message):
    flags = [f.format(**folders) for f in flags]
    with pytest.raises(ValueError) as err:
        config(*flags)
    assert message in str(err.value) and "\n" not in str(err.value)
