"""Model FLOPs of the layers the providers build: the matmuls the model defines, two FLOPs per
multiply-add, counted from the architecture (what Megatron reports as model FLOPs: no activation
recomputation, whatever the kernels do internally).

Attention counts its scores and weighted values over the full s x s square, as the local kernel
computes them and Megatron's formula counts them (flash attention skips the masked half of a
causal square, so its hardware FLOPs are lower).

Each block returns its forward ``Work`` in three kinds, because the backward of each costs
differently (``train``): matmuls with weights whose input comes from outside the block, those
whose input is made inside it, and matmuls of activations with activations (attention, the SSD
scan), which need both input gradients whenever a gradient passes through.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Work:
    first: float = 0.0  # weight matmuls on the block's input
    inner: float = 0.0  # weight matmuls on activations made inside the block
    core: float = 0.0  # activation x activation matmuls

    def __add__(self, other: "Work") -> "Work":
        return Work(self.first + other.first, self.inner + other.inner, self.core + other.core)

    def __rmul__(self, k: float) -> "Work":
        return Work(k * self.first, k * self.inner, k * self.core)

    @property
    def forward(self) -> float:
        return self.first + self.inner + self.core


def linear(tokens: float, d_in: int, d_out: int) -> Work:
    return Work(first=2.0 * tokens * d_in * d_out)


def _inner(w: Work) -> Work:
    return Work(inner=w.forward)


def attention(sequences: float, seq: int, *, hidden: int, heads: int, groups: int,
              head_dim: int) -> Work:
    """QKV (grouped K/V), scores and weighted values per sequence, output projection."""
    tokens = sequences * seq
    return (linear(tokens, hidden, (heads + 2 * groups) * head_dim)
            + Work(core=2 * 2.0 * sequences * seq * seq * heads * head_dim)
            + _inner(linear(tokens, heads * head_dim, hidden)))


def mlp(tokens: float, d_in: int, ffn: int, d_out: int = 0, *, gated: bool = False) -> Work:
    return linear(tokens, d_in, ffn * (2 if gated else 1)) + _inner(linear(tokens, ffn, d_out or d_in))


def moe(tokens: float, hidden: int, *, experts: int, topk: int, ffn: int, shared_ffn: int) -> Work:
    """Router, top-k routed experts per token, the shared expert."""
    shared = mlp(tokens, hidden, shared_ffn) if shared_ffn else Work()
    return linear(tokens, hidden, experts) + topk * mlp(tokens, hidden, ffn) + shared


def mamba(sequences: float, seq: int, hidden: int, *, heads: int, head_dim: int, state: int,
          groups: int, conv_width: int = 4, chunk: int = 128) -> Work:
    """Mamba-2: in_proj (z, x, B, C, dt), depthwise causal conv over x, B, C, the chunked SSD
    scan (C B^T within a chunk and its product with x; chunk states and their read-out), out_proj.
    The scan's elementwise decays are not matmuls and are left out."""
    tokens = sequences * seq
    inner, bc, q = heads * head_dim, 2 * groups * state, min(chunk, seq)
    return (linear(tokens, hidden, 2 * inner + bc + heads)
            + Work(inner=2.0 * tokens * (inner + bc) * conv_width)
            + Work(core=2.0 * tokens * q * (groups * state + inner) + 2 * 2.0 * tokens * state * inner)
            + _inner(linear(tokens, inner, hidden)))


def train(work: Work, *, weights: bool, inputs: bool) -> float:
    """Forward + backward of a block: a weight matmul costs one forward more for its weight
    gradient when the weights train, and one for its input gradient when a gradient must pass
    (on ``first`` matmuls: when something before the block trains); activation x activation
    matmuls cost two more (both operands) whenever a gradient passes through them."""
    passes = weights or inputs
    return (work.first * (1 + weights + inputs) + work.inner * (1 + weights + passes)
            + work.core * (1 + 2 * passes))
