"""The LLaVA recipe end to end, as a user runs it: scripts/run_llava_recipe.sh through the real
launcher on CPU/gloo, hetero 1 + 1. Stage 1 trains the projector of a tiny random Hugging Face
llava (make_tiny_llava.py) on the hf data provider's LLaVA conversations (make_llava_dataset.py)
and saves; stage 2 trains everything from stage 1's checkpoint; the result is exported. Then
transformers' LlavaForConditionalGeneration, loaded from the export, computes stage 2's final
validation loss on the same validation samples (the trainer's own data pipeline gives them):
that evaluation runs the weights the export holds, so the two agree by construction."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.unit_tests.models import hf_models
from tests.unit_tests.models.dist_harness import ROOT, job_env, read_json_lines

SCRIPTS = ROOT / "examples" / "mimo" / "scripts"
# After the script's name: both stages. One evaluation per stage, after its last iteration (an
# eval interval past the end), so stage 2's reads the first validation samples.
ITERS, BATCH, EVAL_ITERS = 3, 4, 1
FLAGS = ["--train-iters", str(ITERS), "--global-batch-size", str(BATCH), "--eval-interval",
         str(ITERS), "--eval-iters", str(EVAL_ITERS), "--lr-warmup-iters", "1",
         "--log-interval", "1"]
# fp32 on both sides (found: 2e-8 relative; the sums run in another order)
RTOL = 1e-5


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The data and the llava folder made in this process (a second interpreter costs seconds);
    the recipe is given them as a user gives their own."""
    from examples.mimo.scripts import make_tiny_llava

    root = tmp_path_factory.mktemp("recipe")
    sys.path.insert(0, str(SCRIPTS))
    try:
        import make_llava_dataset
    finally:
        sys.path.remove(str(SCRIPTS))
    make_llava_dataset.build(str(root / "data"), samples=128, seed=5, image_size=32,
                             vocab_size=256, blank_images=False, text_fraction=0.1,
                             captions="none")
    tokenizer = str(root / "data" / "tokenizer")
    hf = make_tiny_llava.build(str(root / "hf_llava"), tokenizer=tokenizer, seed=3)
    env = job_env(HETERO_PYTHON=sys.executable, HETERO_RUN_DIR=str(root / "run"),
                  HETERO_TIMEOUT_S="240", HF_LLAVA=hf, TOKENIZER=tokenizer,
                  DATA=str(root / "data" / "llava.json"))
    cache = ["--data-cache-path", str(root / "cache")]
    proc = subprocess.run(["bash", str(SCRIPTS / "run_llava_recipe.sh"), *FLAGS, *cache],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "run": root / "run", "hf": hf, "tokenizer": tokenizer, "cache": cache,
            "stdout": proc.stdout}


def validation_samples(recipe, count):
    """The first ``count`` samples of the validation split as the LLM rank reads them (its lane,
    tokenized and padded by the hf provider, images normalised), one dict per sample."""
    from examples.mimo.data import hf
    from examples.mimo.interfaces import RankData
    from examples.mimo.model_providers import llava
    from examples.mimo.training.hetero.config import parse_config

    root = recipe["root"]
    # the recipe's data and model flags (run_llava_recipe.sh's `common`)
    cfg = parse_config(["--device", "cpu", "--model-provider", "llava", "--load-from-hf",
                        recipe["hf"], "--data-provider", "hf", "--data-path",
                        str(root / "data" / "llava.json"), "--tokenizer-model",
                        recipe["tokenizer"], "--split", "90,10", "--micro-batch-size", "2",
                        "--seq-length", "64", *FLAGS, *recipe["cache"]], world_size=2)
    spec, b = llava.data_spec(cfg.model), cfg.batch
    rank = RankData(is_llm=True, dp_rank=0, llm_dp=1, encoder_dp=1,
                    micro_batch_size=b.micro_batch_size, num_microbatches=b.num_microbatches,
                    seq_length=b.seq_length, seed=cfg.runtime.seed, with_images=True)
    data = hf.build_iterator(cfg.data, spec=spec, rank=rank, to_model=lambda batch: batch,
                             split="val")
    samples = []
    while len(samples) < count:
        batch = next(data)
        images = list(batch["images"]) if batch["images"] is not None else []
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["loss_mask"]):
            has_image = bool((ids == spec.image_token_id).any())
            samples.append({"input_ids": ids, "labels": labels, "loss_mask": mask,
                            "image": images.pop(0) if has_image else None})
        assert images == []
    return samples


def test_recipe_trains_both_stages_and_transformers_computes_the_export_as_we_do(recipe):
    run, out = recipe["run"], recipe["stdout"]
    # one summary line per stage, and the export
    assert re.search(rf"^stage 1 \(projector only, from .*hf_llava\): done: iterations 1-{ITERS} "
                     rf"in [\d.]+ s \| training loss .* \| validation loss [\d.]+ \(iteration "
                     rf"{ITERS}\) \| checkpoint .*stage1/iter_000000{ITERS} ", out, re.M), out
    assert re.search(rf"^stage 2 \(everything, from stage 1\): done: iterations 1-{ITERS} in ",
                     out, re.M), out
    export = run / "export" / f"iter_{ITERS:07d}"
    assert re.search(rf"^export: {re.escape(str(export))} ", out, re.M), out
    # stage 2 started from stage 1's weights, with the model unfrozen
    assert re.search(rf"^loaded .*stage1/iter_000000{ITERS} \(iteration {ITERS}, weights only\)",
                     (run / "stage2.log").read_text(), re.M)
    assert "model.freeze_lm: True -> False, model.freeze_vit: True -> False" in out
    config = json.loads((export / "config.json").read_text())
    assert (config["model_type"], config["image_token_index"]) == ("llava", 255)
    assert os.path.exists(export / "tokenizer.json")

    from transformers import LlavaForConditionalGeneration

    stage2 = read_json_lines(run / "stage2.jsonl")
    [final] = [r for r in stage2 if "validation_lm_loss" in r]
    assert final["iteration"] == ITERS
    model = LlavaForConditionalGeneration.from_pretrained(
        str(export), dtype=torch.float32, attn_implementation="eager").eval()
    samples = validation_samples(recipe, EVAL_ITERS * BATCH)
    assert any(s["image"] is not None for s in samples)
    assert final["validation_tokens"] == int(sum(s["loss_mask"].sum() for s in samples))
    assert hf_models.llava_loss(model, samples) == pytest.approx(final["validation_lm_loss"],
                                                                 rel=RTOL)
    # and the export is not the starting folder: stage 2 trained the language model
    source = LlavaForConditionalGeneration.from_pretrained(recipe["hf"], dtype=torch.float32)
    assert not torch.equal(source.get_input_embeddings().weight,
                           model.get_input_embeddings().weight)
