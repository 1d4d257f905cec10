"""Measure, in the backward, how much each compressed tensor's rounding noise adds to the gradient variance.

Derivation. Stochastic rounding of a tensor X to b bits stores X̂ = X + E, with independent, zero-mean
errors; an element of group g has Var(E) = s_g² p(1-p) ≤ s_g²/4, s_g = range_g / (2^b - 1) its step, so
on average over p, Var(E) = c · range_g² / (2^b - 1)², c = 1/6.

* Linear consumer (mm, bmm, convolution_backward reading X̂ for a weight gradient): dW = Gᵀ X̂ (the same
  for convolutions, over the window positions). Each element of dW sums products G_ik X̂_ij over the
  contraction index i, so the noise adds Σ_kj Σ_i G_ik² Var(E_ij) to the summed variance of dW. If the
  gradient's row norms are uncorrelated with the groups' ranges, this is
      Var = A · R · c / (2^b - 1)²,   A = ‖G‖² · fan_in / numel(X),   R = group · Σ_g range_g²
  with fan_in the number of X elements each gradient element meets (the weight's size over its output
  features: X's other dimension for a matmul, C_in · kernel area for a convolution). A is a gradient
  factor, R the tensor's summed squared range (R / numel is its mean range² per element).
* Any other consumer (an elementwise backward such as GELU's, attention): the noise goes through a local
  derivative we do not model. R is still measured; the gradient factor is taken as the largest A of the
  tensors measured in the same session ("fall back to numel": the weight is numel · mean range² · that A).
  The largest, not a typical one: such a path is often a normalization's, whose noise reaches every layer
  upstream (below). With the median, on the enwiki TinyGPT after 300 AdamW steps (bench/gradient_error.py,
  model "enwiki"), the 1.5-bit re-plan moved bits from LayerNorm x̂ to the matmul inputs: the whole-model
  error fell 2.87 -> 2.49 but the mean over layers rose 1.94 -> 2.09 (LayerNorm γ 0.12 -> 1.37), and
  training ended worse than static at two seeds. With the largest, the re-plan at step 20 of that
  training still moved LayerNorm x̂ and attention output bits (1.5 bits: 3.6647 / 3.6634 bits/byte at
  seeds 0 / 1 against static's 3.6066 / 3.6378). So re-plans keep every tensor that is not fully
  measured at the bits it has (actc/session.py, ``measured``): its weight only enters the proxy as a
  constant, and the measured tensors share the bytes the others leave.
  A tensor the backward reads broadcast (a position embedding added to each of B rows) has its R counted
  B times: each stored error reaches B elements, with one sign, which is at least the variance of B
  independent errors (passes/candidates.py, ``broadcast_factor``). Found on TinyGPT: counted once, its
  position embedding looked 1/16 as sensitive as it is and re-plans dropped it from 8 bits to 1.
* A tensor that a weight-gradient op reads and something else reads too (attention's output, read by the
  projection's weight gradient and by attention's backward, where it enters the input gradient of q and
  k) has noise paths the statistic does not follow; the session adds the fallback weight for them (a
  "partial" row), so a measured weight gradient can raise its weight but not lower it below the fallback;
  like a fallback row, it keeps its bits through re-plans.
* Normalizations (BatchNorm / LayerNorm inputs, or their x̂) are in that fallback on purpose. Their backward
  rebuilds x̂ = (X̂ - mean) · rstd and takes dγ = Σ G ⊙ x̂, which is linear in E like a weight gradient
  (A = ‖G ⊙ rstd‖² / numel, D = ‖dγ‖²). But x̂ also enters the input gradient, dx ∝ G - mean(G) - x̂ ·
  mean(G ⊙ x̂), and from there every layer upstream, which no local reduction sees. Both ways of using the
  dγ term were measured (bench/gradient_error.py, 256 draws, with a variant of this module not kept):
  dγ alone gave ConvNet's last BatchNorm input 1 bit at a 2-bit budget, and the relative gradient
  variance of every layer upstream rose (layer mean 0.30 -> 0.49, whole model 0.022 -> 0.034); dγ plus
  the median weight left ConvNet's plans as static's and raised TinyGPT's at 1.5 bits (layer mean 1.59 ->
  2.11, whole 3.36 -> 3.47), against 1.33 and 3.34 with the fallback.

The allocator's proxy is weight / (2^b - 1)², so weight = A · R (the constant c drops out of the argmin).
The defaults (weight = numel, times that factor) are the same formula with A = 1 and a unit range.

Absolute or relative (option ``sensitivity``). A · R sums the variance over all parameters: what plain SGD
adds to its step. Adam-family optimizers divide each parameter's step by its gradient's running RMS, so a
layer's update noise is its variance over its squared gradient, whatever the layer's gradient scale; the
summed absolute variance then favours the layers with the largest gradients (the LM head) and starves the
others. ``"relative"`` divides each linear consumer's term by D = ‖dW‖², the squared norm of the gradient
it computes (one more reduction, over a parameter-sized tensor), and sums relative variances instead:
weight = A · R / D. Other consumers take the largest A / D. D is measured on the dequantized tensor, so it
holds the rounding noise too; the session subtracts its expectation, A · R · c / (2^b - 1)² at the bits the
tensor had (actc/session.py, ``_signal``).

Cost. For each compressed tensor, three reductions: ‖G‖² of a gradient the consumer reads anyway and ‖dW‖²
of the gradient it writes, inserted right after the consumer so no tensor lives longer, and Σ range² from
the per-group metadata the dequantize reads. The rows (A, R, D; -1 where not measured) are stacked into
one [n, 3] tensor and handed to ``actc::observe``, which adds
it to the session's buffer on the device: no host sync, no extra forward or backward pass.

Before → after (backward):
    mm_1 = aten.mm(permute_3, view_4)                  mm_1 = aten.mm(permute_3, view_4)
                                                       stat = <stack(sum(permute_3²)·fan_in/numel,
                                                                     group·sum((meta[:,1]·levels)²),
                                                                     sum(mm_1²))>
    ...                                                ...
    return (...)                                       actc.observe(stack([stat, ...]), session, key)
                                                       return (...)
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from actc import _torch_compat as compat
from actc.passes.candidates import is_view, op_name
from actc.passes.rewrite import Decision, inline, node_order


ROUNDING_VARIANCE = 1 / 6  # c: the mean of p(1-p) over p uniform in [0, 1)


@torch.library.custom_op("actc::observe", mutates_args=("stats",))
def observe_op(stats: torch.Tensor, session: int, key: str) -> None:
    """Add ``stats`` to the statistics buffer of region ``key`` of session ``session`` (a device add).

    Declared as mutating ``stats`` so that no graph pass removes it as dead code; it does not write it."""
    from actc.session import observe

    observe(session, key, stats)


@observe_op.register_fake
def _(stats, session, key) -> None:
    return None


def insert_statistics(bw: fx.GraphModule, decisions: list[Decision], session_id: int,
                      key: str) -> tuple[list[str], set[str]]:
    """Add the statistics of every quantized tensor to ``bw``; returns the tensor names, one per row, and
    those whose row measures only a part of their sensitivity (a weight gradient, but other readers too)."""
    rows, names, partial = [], [], set()
    order = node_order(bw)
    for d in decisions:
        if d.saved.kind != "quant" or not d.bw_parts or not d.bw_values:
            continue
        meta = d.bw_parts[1]
        levels, group, numel = (1 << d.bits) - 1, d.group, d.saved.numel
        found = linear_consumer(d.bw_values)
        if found is not None:
            consumer, grad, fan_in, out = found
            if other_readers(d.bw_values):
                partial.add(d.saved.name)
            inputs = [grad, meta] + ([out] if out is not None else [])
            traced = compat.trace(_linear_statistic(fan_in / numel, group, levels), *[n.meta["val"] for n in inputs])
            (row,) = inline(bw.graph, max(consumer, out or consumer, key=order).next, traced, inputs)
        else:
            spread = d.saved.spread  # broadcast in the backward: each stored error counts that many times

            def statistic(m):
                r = group * spread * (m[:, 1].float() * levels).square().sum()
                return torch.stack([r * 0 - 1, r, r * 0 - 1])  # A = D = -1: no consumer measured

            first_reader = min(meta.users, key=order)
            traced = compat.trace(statistic, meta.meta["val"])
            (row,) = inline(bw.graph, first_reader, traced, [meta])
        rows.append(row)
        names.append(d.saved.name)
    if not rows:
        return [], set()
    out = bw.graph.find_nodes(op="output")[0]
    traced = compat.trace(lambda *r: torch.stack(r), *[r.meta["val"] for r in rows])
    (stacked,) = inline(bw.graph, out, traced, rows)
    with bw.graph.inserting_before(out):
        call = bw.graph.call_function(torch.ops.actc.observe.default, (stacked, session_id, key))
    call.meta["val"] = None
    bw.graph.lint()
    bw.recompile()
    return names, partial


def _linear_statistic(per_element: float, group: int, levels: int):
    def statistic(g, m, out=None):
        a = g.float().square().sum() * per_element
        d = out.float().square().sum() if out is not None else a * 0 - 1
        return torch.stack([a, group * (m[:, 1].float() * levels).square().sum(), d])
    return statistic


def linear_consumer(values: list[fx.Node]):
    """(consumer, gradient operand, fan_in, output) for the first weight-gradient op reading ``values``
    (through views) in the backward, or None. ``output`` is the node holding the gradient the consumer
    computes (its weight gradient for a convolution; None if nothing reads it)."""
    for user, reach in _readers(values):
        found = _operands(user, reach)
        if found is not None:
            return (user, *found)
    return None


def other_readers(values: list[fx.Node]) -> bool:
    """Does anything but a weight-gradient op read ``values`` (through views) in the backward?"""
    return any(user.op != "output" and _operands(user, reach) is None for user, reach in _readers(values))


def _readers(values: list[fx.Node]):
    """The non-view nodes that read ``values`` through views, breadth first, each with the set of ``values``
    and the views of them found so far (``_operands`` tells X's operand by it)."""
    reach, frontier = set(values), list(values)
    while frontier:
        for user in frontier.pop(0).users:
            if user in reach:
                continue
            if is_view(user):
                reach.add(user)
                frontier.append(user)
            else:
                yield user, reach


def _operands(user: fx.Node, reach: set):
    name, args = op_name(user), user.args
    shape = lambda n: n.meta["val"].shape  # noqa: E731
    if name in ("mm", "bmm") and (args[0] in reach) != (args[1] in reach):
        x_first = args[0] in reach
        lead = 1 if name == "bmm" else 0
        fan_in = shape(args[0])[lead] if x_first else shape(args[1])[lead + 1]
        return (args[1] if x_first else args[0]), _int(fan_in), user
    if name == "convolution_backward" and args[1] in reach and args[0] not in reach:
        weight = shape(args[2])
        grad_weight = next((u for u in user.users if u.target is operator.getitem and u.args[1] == 1), None)
        return args[0], _int(math.prod(weight) // weight[0]), grad_weight
    return None


def _int(x) -> int:
    return x if isinstance(x, int) else compat.hint(x)
