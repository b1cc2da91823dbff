"""Verify a draft tree against the target: greedy, or lossless recursive rejection sampling.

Both verifiers walk the tree from the root (the last emitted token) and return the accepted path
plus one *bonus* token drawn from the target at the last accepted node, so every step emits at
least one token and the emitted tokens are distributed exactly as plain target sampling.

Which distribution is which (as in gpt-fast's `speculative_decode`, with the letters the other
way round: here **p is the target** and **q is the draft**):

    p = target_probs[node]     the target model's distribution after `node` (already processed by
                               temperature / top-k / top-p, so it is what plain sampling draws from)
    q = tree.draft_probs[c]    the draft distribution child c's token was sampled from; None means
                               c was chosen deterministically and q is one-hot on its token

    accept child c (token x)   with probability min(1, p[x] / q[x])
    on rejection               p <- normalize(max(p - q, 0)), then try the next sibling
    no child accepted          bonus ~ the residual p
    walk reached a leaf        bonus ~ target_probs[leaf]

Multiple candidates per node (SpecInfer's multi-step speculative sampling) stay exact when each
sibling's token, given the siblings before it, is distributed as its own q: i.i.d. samples from
one q (kept as separate nodes even when their tokens coincide), or deterministic tokens, or a mix.
Siblings drawn *without* replacement (Gumbel top-k, deduplicated samples) do not satisfy this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsrt.runtime.sampling import SamplingParams, target_probs as make_target_probs
from lsrt.runtime.spec.tree import DraftTree

# A residual max(p - q, 0) with less mass than this is float noise: it only arises when q equals
# p up to rounding, in which case the rejection itself was a rounding artefact (its true
# probability is the residual mass). We then accept the candidate instead of sampling from noise.
_DEGENERATE_MASS = 1e-6


@dataclass
class Acceptance:
    """The outcome of verifying one tree.

    `path` holds node indices from the root (always included: it is the already-emitted token)
    to the last accepted node; `tokens` are the accepted draft tokens (root excluded), and `bonus`
    is the token drawn from the target at the last accepted node. Emit `tokens + [bonus]`.
    """

    path: list[int]
    tokens: list[int]
    bonus: int

    @property
    def num_accepted(self) -> int:
        return len(self.tokens)

    @property
    def emitted(self) -> list[int]:
        return [*self.tokens, self.bonus]


def _check_rows(tree: DraftTree, rows: torch.Tensor, what: str) -> None:
    if rows.dim() != 2 or rows.shape[0] != len(tree):
        raise ValueError(f"{what} must be [{len(tree)}, vocab], got {list(rows.shape)}")


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor) -> Acceptance:
    """Accept the longest path whose every token is the target's argmax at its parent.

    target_logits: [n, vocab], row i predicts the token after node i. One argmax over all nodes
    and one `.tolist()`: the walk itself is plain Python, with no device sync per node.
    """
    _check_rows(tree, target_logits, "target_logits")
    best = target_logits.argmax(dim=-1).tolist()  # [n]
    children, tokens = tree.children, tree.tokens
    path = [0]
    node = 0
    while True:
        nxt = next((c for c in children[node] if tokens[c] == best[node]), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return Acceptance(path=path, tokens=[tokens[i] for i in path[1:]], bonus=best[node])


def _draw_from(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from `probs` ([vocab], any scale) with a uniform u in [0, 1).

    Done by hand rather than with torch.multinomial so the generator may live on another device
    than the probabilities; float64 keeps the CDF of a 152K vocabulary accurate. Tokens of zero
    probability are never returned.
    """
    cdf = probs.cumsum(0, dtype=torch.float64)  # [vocab]
    idx = int(torch.searchsorted(cdf, cdf[-1:] * u, right=True))
    if idx >= probs.shape[0]:  # u * total rounded up to total
        idx = int(probs.argmax())
    return idx


def _first_pass(tree: DraftTree, probs: torch.Tensor,
                uniforms: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """p[parent(c), tok(c)], q_c[tok(c)] for every node c, and the uniforms: one device sync.

    These are all the scalars the walk needs while nothing is rejected (the common case). Each
    distinct draft tensor is gathered once, so i.i.d. siblings sharing a q cost nothing extra.
    """
    n, vocab = probs.shape
    slot: dict[int, int] = {}  # id(q) -> its block in the concatenated distinct drafts
    qs: list[torch.Tensor] = []
    stoch = [i for i in range(1, n) if tree.draft_probs[i] is not None]
    for i in stoch:
        if slot.setdefault(id(tree.draft_probs[i]), len(qs)) == len(qs):
            qs.append(tree.draft_probs[i])
    flat = [tree.parents[i] * vocab + tree.tokens[i] for i in range(1, n)]
    flat += [slot[id(tree.draft_probs[i])] * vocab + tree.tokens[i] for i in stoch]
    index = torch.tensor(flat, dtype=torch.long, device=probs.device)  # [n - 1 + len(stoch)]
    parts = [torch.take(probs, index[: n - 1])]  # [n - 1]
    if qs:
        q_flat = torch.cat(qs).to(probs.device, probs.dtype)  # [len(qs) * vocab]
        parts.append(torch.take(q_flat, index[n - 1:]))  # [len(stoch)]
    parts = [x.double() for x in parts] + [uniforms.to(probs.device)]
    both = torch.cat(parts).tolist()
    q_tok = [1.0] * n
    for j, i in enumerate(stoch):
        q_tok[i] = both[n - 1 + j]
    return [0.0, *both[: n - 1]], q_tok, both[n - 1 + len(stoch):]


def _residual(r: torch.Tensor, m: float, tree: DraftTree, child: int) -> torch.Tensor:
    """max(r / m - q, 0) * m: the residual after rejecting `child`, left unnormalised."""
    q = tree.draft_probs[child]
    if q is None:  # one-hot draft: zero the token out, exactly
        res = r.clone()
        res[tree.tokens[child]] = 0.0
        return res
    return torch.sub(r, q.to(device=r.device, dtype=r.dtype), alpha=m).clamp_(min=0.0)


def _try_children(tree: DraftTree, node: int, row: torch.Tensor, uniforms: list[float],
                  p_tok: list[float], q_tok: list[float]) -> tuple[int | None, torch.Tensor]:
    """Try `node`'s children in order: (accepted child, _) or (None, distribution for the bonus).

    The target at `node` is p = r / m: r starts as the target row (m = 1) and becomes the
    unnormalised residual after each rejection, so no division is ever needed. (m cannot
    underflow in practice: reaching mass m has probability about m.)
    """
    r, m = row, 1.0  # [vocab], its mass
    kids = tree.children[node]
    for j, c in enumerate(kids):
        # Accept with probability min(1, p[x] / q[x]), written as u * q[x] * m < r[x] so that
        # q[x] == 0 cannot divide by zero and a token with p[x] == 0 is never accepted.
        if uniforms[c] * q_tok[c] * m < p_tok[c]:
            return c, r
        res = _residual(r, m, tree, c)  # [vocab]
        later = kids[j + 1] if j + 1 < len(kids) else None
        mass = res.sum()
        vals = (torch.stack([mass, res[tree.tokens[later]]]) if later is not None
                else mass.reshape(1)).tolist()  # one sync per rejection
        if vals[0] <= _DEGENERATE_MASS * m:
            if p_tok[c] > 0.0:  # rejected by rounding only: see _DEGENERATE_MASS
                return c, r
            continue  # keep p: never emit a token outside the target's support
        r, m = res, vals[0]
        if later is not None:
            p_tok[later] = vals[1]
    return None, r


def verify_sampling(tree: DraftTree, target_probs: torch.Tensor,
                    generator: torch.Generator | None) -> Acceptance:
    """Recursive rejection sampling over the tree; the emitted tokens follow the target exactly.

    target_probs: [n, vocab] float32, row i = target distribution after node i (already through
    temperature / top-k / top-p). Uniforms come from `generator` (seeded => reproducible); they
    are drawn up front, one per node plus one for the bonus. Device syncs: one for the scalars of
    the whole tree and the uniforms, one per rejected child, one for the bonus draw.
    """
    _check_rows(tree, target_probs, "target_probs")
    n = len(tree)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n + 1, generator=generator, device=gen_device, dtype=torch.float64)  # [n + 1]
    # p_tok[c] = p_parent(c)[x_c] (the target), q_tok[c] = q_c[x_c] (the draft), u[c] per node.
    p_tok, q_tok, uniforms = _first_pass(tree, target_probs, u)
    path, node = [0], 0
    while True:
        child, dist = _try_children(tree, node, target_probs[node], uniforms, p_tok, q_tok)
        if child is None:
            return Acceptance(path=path, tokens=[tree.tokens[i] for i in path[1:]],
                              bonus=_draw_from(dist, uniforms[n]))
        path.append(child)
        node = child


def verify(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> Acceptance:
    """Greedy or sampling verification of `tree` from the target's raw logits ([n, vocab])."""
    if params.greedy:
        return verify_greedy(tree, logits)
    return verify_sampling(tree, make_target_probs(logits, params), generator)
