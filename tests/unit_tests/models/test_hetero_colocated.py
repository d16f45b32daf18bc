"""--colocated checkpointing on CPU/gloo (its loss parity is in test_hetero_parity.py)."""

from tests.unit_tests.models.dist_harness import train
from tests.unit_tests.models.test_hetero_checkpoint import SIX, same


def test_colocated_resume_is_bit_exact(tmp_path):
    """Both modules data-parallel over the same 2 ranks: saved at 3, resumed to 6, equal to the
    straight colocated run bit for bit."""
    args = SIX + ["--colocated", "--encoder-dp", "2", "--llm-dp", "2"]
    whole = train(2, tmp_path, args, "whole")
    ckpt = str(tmp_path / "ckpt")
    first = train(2, tmp_path, args + ["--save", ckpt, "--exit-interval", "3"], "a")
    second = train(2, tmp_path, args + ["--load", ckpt], "b")
    same(whole, first + second)
