"""Multi-process gloo tests: exact rank lists of every process group on every rank, and tensors
crossing the encoder->LLM bridge (fan-out, one-to-one, fan-in, into TP and PP LLM grids)."""

import json

import pytest

from examples.mimo.training.hetero.topology import REQUIRED_GROUPS
from tests.unit_tests.models.dist_harness import torchrun

ENC = list(range(4))  # encoder DP rank 0 sends rows 0..3, DP rank 1 sends 100..103
ENC1 = [100.0 + r for r in range(4)]


def expect(rank, module, received=None, **groups):
    """Every group of this rank; a group not named is the rank alone."""
    full = {f: [rank] for f in REQUIRED_GROUPS + ("embd", "pos_embd")}
    if module == "images":
        full["embd"] = full["pos_embd"] = None
    full.update(groups)
    return {"module": module, "groups": full, "received": received}


DP12 = dict(dp=[1, 2], dp_cp=[1, 2], intra_dp_cp=[1, 2], tp_dp=[1, 2], tp_dp_cp=[1, 2],
            intra_dist_opt=[1, 2], expt_dp=[1, 2], intra_expt_dp=[1, 2])
TP12 = dict(tp=[1, 2], tp_cp=[1, 2], mp=[1, 2], tp_dp=[1, 2], tp_dp_cp=[1, 2],
            intra_dist_opt=[1, 2], expt_tp=[1, 2], tp_ep=[1, 2], tp_ep_pp=[1, 2])
PP12 = dict(pp=[1, 2], mp=[1, 2], intra_dist_opt=[1, 2], tp_ep_pp=[1, 2], embd=[1, 2])


def dp_pair(a, b):
    pair = [a, b]
    return dict(dp=pair, dp_cp=pair, intra_dp_cp=pair, tp_dp=pair, tp_dp_cp=pair,
                intra_dist_opt=pair, expt_dp=pair, intra_expt_dp=pair)


LAYOUTS = {
    # name: ((encoder_tp, encoder_dp, llm_tp, llm_pp, llm_dp, llm_ep, llm_only), expected per rank)
    "enc1_llm1": ((1, 1, 1, 1, 1, 1, 0),
                  [expect(0, "images"), expect(1, "language", ENC)]),
    "enc1_llm_dp2_fan_out": ((1, 1, 1, 1, 2, 1, 0),
                             [expect(0, "images"), expect(1, "language", [0.0, 1.0], **DP12),
                              expect(2, "language", [2.0, 3.0], **DP12)]),
    "enc_dp2_llm_dp2": ((1, 2, 1, 1, 2, 1, 0),
                        [expect(0, "images", **dp_pair(0, 1)), expect(1, "images", **dp_pair(0, 1)),
                         expect(2, "language", ENC, **dp_pair(2, 3)),
                         expect(3, "language", ENC1, **dp_pair(2, 3))]),
    "enc_dp2_llm1_fan_in": ((1, 2, 1, 1, 1, 1, 0),
                            [expect(0, "images", **dp_pair(0, 1)),
                             expect(1, "images", **dp_pair(0, 1)),
                             expect(2, "language", ENC + ENC1)]),
    "enc1_llm_tp2": ((1, 1, 2, 1, 1, 1, 0),
                     [expect(0, "images"), expect(1, "language", ENC, **TP12),
                      expect(2, "language", ENC, **TP12)]),
    "enc1_llm_pp2": ((1, 1, 1, 2, 1, 1, 0),
                     [expect(0, "images"), expect(1, "language", ENC, **PP12),
                      expect(2, "language", None, **dict(PP12, pos_embd=None))]),
    "llm_only_ep2": ((1, 1, 1, 1, 2, 2, 1),
                     [expect(r, "language", **dict(dp_pair(0, 1), expt_dp=[r], intra_expt_dp=[r],
                                                   ep=[0, 1], tp_ep=[0, 1], tp_ep_pp=[0, 1]))
                      for r in (0, 1)]),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every layout, one job per world size: a topology is destroyed before the next is built."""
    out = tmp_path_factory.mktemp("topology")
    by_world = {}
    for name, (grid, expected) in LAYOUTS.items():
        by_world.setdefault(len(expected), []).append(f"{name}:{','.join(map(str, grid))}")
    for world, layouts in sorted(by_world.items()):
        torchrun(world, "tests.unit_tests.models.workers.topology_worker", [str(out), *layouts],
                 timeout=240)
    return out


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_groups_and_bridge(name, built):
    _, expected = LAYOUTS[name]
    for rank, want in enumerate(expected):
        got = json.loads((built / f"{name}.rank{rank}.json").read_text())
        assert got == want, f"rank {rank}"
