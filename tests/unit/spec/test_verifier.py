"""Verifier tests: hand-built greedy cases, a greedy property check against plain greedy decoding,
seeded repeatability, degenerate residuals, and the statistical losslessness check.

Losslessness: a toy target model gives a fixed random distribution p(ctx) for every context (a
tuple of tokens); drafts are sampled from q(ctx). For >= 10^5 verification steps we record the first
emitted token and, when the first token was an accepted draft, the second one; both must follow
the target (chi-square, critical value from Wilson-Hilferty at alpha ~ 1e-6). Deliberately wrong
verifiers run through the same check and must fail it, which shows the check has power.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch

from lsrt.runtime.sampling import SamplingParams, sample, target_probs
from lsrt.runtime.spec.tree import DraftTree
from lsrt.runtime.spec.verifier import Acceptance, verify, verify_greedy, verify_sampling

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add wake-up latency (100x on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


V = 6
DRAWS = 100_000
Z_CRIT = 4.75  # one-sided normal quantile for alpha ~ 1e-6


# ----------------------------------------------------------------------------- greedy

def _logits_with_argmax(best: list[int], vocab: int = 10, seed: int = 0) -> torch.Tensor:
    """[n, vocab] random logits whose row i has its maximum at best[i]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(best), vocab, generator=g)
    logits[torch.arange(len(best)), torch.tensor(best)] = logits.max() + 1.0
    return logits


def test_greedy_full_acceptance() -> None:
    tree = DraftTree.chain(9, [3, 4, 5])
    acc = verify_greedy(tree, _logits_with_argmax([3, 4, 5, 7]))
    assert acc == Acceptance(path=[0, 1, 2, 3], tokens=[3, 4, 5], bonus=7)
    assert acc.emitted == [3, 4, 5, 7] and acc.num_accepted == 3


def test_greedy_partial_acceptance() -> None:
    tree = DraftTree.chain(9, [3, 4, 5])
    acc = verify_greedy(tree, _logits_with_argmax([3, 6, 5, 7]))
    assert acc == Acceptance(path=[0, 1], tokens=[3], bonus=6)


def test_greedy_zero_acceptance() -> None:
    tree = DraftTree.chain(9, [3, 4, 5])
    acc = verify_greedy(tree, _logits_with_argmax([2, 4, 5, 7]))
    assert acc == Acceptance(path=[0], tokens=[], bonus=2)


def test_greedy_root_only_tree() -> None:
    acc = verify_greedy(DraftTree.chain(1, []), _logits_with_argmax([8]))
    assert acc == Acceptance(path=[0], tokens=[], bonus=8)


def test_greedy_picks_the_matching_sibling() -> None:
    # 0 -> {1:4, 2:5, 3:6}; 3 -> {4:1, 5:2}; 1 -> {6:2}
    tree = DraftTree(tokens=[0, 4, 5, 6, 1, 2, 2], parents=[-1, 0, 0, 0, 3, 3, 1])
    #                 node: 0  1  2  3  4  5  6
    acc = verify_greedy(tree, _logits_with_argmax([6, 2, 0, 2, 0, 9, 0]))
    assert acc == Acceptance(path=[0, 3, 5], tokens=[6, 2], bonus=9)
    # Same tree, the target prefers the first branch instead.
    acc = verify_greedy(tree, _logits_with_argmax([4, 2, 0, 2, 0, 9, 3]))
    assert acc == Acceptance(path=[0, 1, 6], tokens=[4, 2], bonus=3)


def test_greedy_matches_plain_greedy_decoding_on_random_trees() -> None:
    """Property: emitted == the target's own greedy continuation, and the path is maximal."""
    rng = random.Random(0)
    vocab = 5
    table: dict[tuple[int, ...], torch.Tensor] = {}

    def logits_of(ctx: tuple[int, ...]) -> torch.Tensor:
        if ctx not in table:
            gen = torch.Generator().manual_seed(hash(ctx) % 2**62)
            table[ctx] = torch.randn(vocab, generator=gen)
        return table[ctx]

    def greedy_decode(ctx: tuple[int, ...], steps: int) -> list[int]:
        out = []
        for _ in range(steps):  # plain greedy decoding, one token at a time
            out.append(int(logits_of(ctx).argmax()))
            ctx = (*ctx, out[-1])
        return out

    accepted = []
    for _ in range(300):
        root = rng.randrange(vocab)
        paths = [[rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
                 for _ in range(rng.randint(1, 3))]
        good = greedy_decode((root,), rng.randint(1, 4))  # a path that is (partly) right
        good[rng.randrange(len(good))] = rng.randrange(vocab)
        paths.insert(rng.randrange(len(paths) + 1), good)
        tree = DraftTree.from_paths(root, paths)
        ctxs = [tuple(tree.tokens[i] for i in tree.path_to(j)) for j in range(len(tree))]
        acc = verify_greedy(tree, torch.stack([logits_of(c) for c in ctxs]))
        assert acc.emitted == greedy_decode((root,), acc.num_accepted + 1)
        assert [tree.tokens[i] for i in acc.path] == [root, *acc.tokens]
        assert all(tree.parents[b] == a for a, b in zip(acc.path, acc.path[1:]))
        assert acc.bonus not in [tree.tokens[c] for c in tree.children[acc.path[-1]]]
        accepted.append(acc.num_accepted)
    assert sum(a >= 2 for a in accepted) >= 30, "the property was barely exercised"


def test_verify_dispatches_on_params() -> None:
    tree = DraftTree(tokens=[0, 4, 5, 6, 1, 2, 2], parents=[-1, 0, 0, 0, 3, 3, 1])
    logits = _logits_with_argmax([6, 2, 0, 2, 0, 9, 0])
    expect = Acceptance(path=[0, 3, 5], tokens=[6, 2], bonus=9)
    assert verify(tree, logits, SamplingParams(temperature=0.0), None) == expect
    # The sampling verifier over greedy's one-hot distribution must agree with greedy.
    onehot = target_probs(logits, SamplingParams(temperature=0.0))
    assert verify_sampling(tree, onehot, torch.Generator().manual_seed(3)) == expect


def test_bad_shapes_raise() -> None:
    tree = DraftTree.chain(0, [1, 2])
    with pytest.raises(ValueError):
        verify_greedy(tree, torch.zeros(2, 5))
    with pytest.raises(ValueError):
        verify_sampling(tree, torch.full((4, 5), 0.2), None)


# ----------------------------------------------------------------------------- toy target/draft

class Toy:
    """A toy target and draft: fixed random distributions per context, in tables.

    A context is the path of tokens after the root (root token 0); its row is numbered like a
    V-ary heap: ctx(root) = 0, ctx(child) = ctx(parent) * V + token + 1. `drafts[d]` names the
    draft distribution q used at contexts of depth d (i.e. for the nodes at depth d + 1).
    """

    def __init__(self, seed: int, drafts: tuple[str, ...]) -> None:
        num_ctx = (V ** (len(drafts) + 1) - 1) // (V - 1)
        g = torch.Generator().manual_seed(seed)
        w = 0.25 + torch.rand(num_ctx, V, generator=g)  # no tiny masses: chi-square stays valid
        w.scatter_(1, torch.rand(num_ctx, V, generator=g).argsort(-1)[:, :2], 0.0)
        self.p = w / w.sum(-1, keepdim=True)  # [num_ctx, V] target; 2 zero tokens per context
        # Deterministic candidates: a random order with a supported token first (so that
        # deterministic drafts are sometimes accepted); the others may be outside p's support.
        key = torch.rand(num_ctx, V, generator=g)
        key.scatter_(1, (key * (w > 0)).argmax(-1, keepdim=True), -1.0)
        self.order = key.argsort(-1)  # [num_ctx, V]
        rand = torch.softmax(2.0 * torch.randn(num_ctx, V, generator=g), -1)
        kinds = {
            "same": self.p.clone(),  # equal values, another tensor
            "near": 0.8 * self.p + 0.2 * rand,  # small residuals: rejections are rare
            "disjoint": (self.p == 0).float() / 2.0,
            "random": rand,
        }
        self.q = torch.empty(num_ctx, V)
        for d, kind in enumerate(drafts):
            lo, hi = (V ** d - 1) // (V - 1), (V ** (d + 1) - 1) // (V - 1)
            self.q[lo:hi] = kinds[kind][lo:hi]
        self.q_rows = list(self.q.unbind(0))  # [V] each; siblings share their parent's row


def template(shape: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Parents, depth and sibling index of a tree with shape[d] children per depth-d node."""
    parents, depth, sib, frontier = [-1], [0], [0], [0]
    for d, k in enumerate(shape):
        nxt = []
        for node in frontier:
            for s in range(k):
                nxt.append(len(parents))
                parents.append(node)
                depth.append(d + 1)
                sib.append(s)
        frontier = nxt
    return parents, depth, sib


def draw_trees(toy: Toy, shape: list[int], modes: tuple[str, ...], draws: int,
               gen: torch.Generator) -> tuple[list[DraftTree], torch.Tensor]:
    """`draws` draft trees and their context ids ([draws, n]), sampled in a vectorised way.

    modes[d] says how the children of depth-d nodes are drafted: "iid" (k i.i.d. samples from
    q, duplicates kept), "det" (k distinct fixed tokens, draft_probs None), "mixed" (a fixed
    token twice, then k - 2 i.i.d. samples from q).
    """
    parents, depth, sib = template(shape)
    n = len(parents)
    ctx = torch.zeros(draws, n, dtype=torch.long)
    tok = torch.zeros(draws, n, dtype=torch.long)
    mode = [""] + [modes[depth[i] - 1] for i in range(1, n)]
    stochastic = [m == "iid" or (m == "mixed" and sib[i] > 1) for i, m in enumerate(mode)]
    for i in range(1, n):
        pc = ctx[:, parents[i]]
        if stochastic[i]:
            t = torch.multinomial(toy.q[pc], 1, generator=gen).squeeze(1)
        else:
            t = toy.order[pc, sib[i] if mode[i] == "det" else 0]
        tok[:, i], ctx[:, i] = t, pc * V + t + 1
    trees = []
    for toks, cs in zip(tok.tolist(), ctx.tolist()):
        probs = [toy.q_rows[cs[parents[i]]] if stochastic[i] else None for i in range(n)]
        trees.append(DraftTree(tokens=toks, parents=parents, draft_probs=probs))
    return trees, ctx


# ----------------------------------------------------------------------------- chi-square

def chi2_critical(df: int, z: float = Z_CRIT) -> float:
    """Wilson-Hilferty approximation of the chi-square upper quantile."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_stat(counts: list[int], p: list[float]) -> tuple[float, int]:
    """Pearson statistic and df over the cells with p > 0; inf when a p == 0 cell was hit."""
    total = sum(counts)
    if any(c and not pi for c, pi in zip(counts, p)):
        return math.inf, 1
    cells = [(c, total * pi) for c, pi in zip(counts, p) if pi > 0]
    return sum((c - e) ** 2 / e for c, e in cells), len(cells) - 1


def emitted_stats(outs: list[list[int]], p_first: list[float],
                  p_second: Callable[[int], list[float]]) -> tuple[float, float, float, float]:
    """(chi2, critical) of the first emitted token and of the second given an accepted first."""
    first = [0] * V
    second: dict[int, list[int]] = {}
    for out in outs:
        first[out[0]] += 1
        if len(out) > 1:
            second.setdefault(out[0], [0] * V)[out[1]] += 1
    s1, df1 = chi2_stat(first, p_first)
    s2, df2 = 0.0, 0
    for tok, counts in second.items():
        if sum(counts) >= 500:  # expected >= ~40 per cell (target masses are >= ~0.08)
            s, df = chi2_stat(counts, p_second(tok))
            s2, df2 = s2 + s, df2 + df
    return s1, chi2_critical(df1), s2, (chi2_critical(df2) if df2 else math.inf)


Verifier = Callable[[DraftTree, torch.Tensor, torch.Generator], list[int]]


def run_toy(toy: Toy, shape: list[int], modes: tuple[str, ...], verifier: Verifier, seed: int,
            draws: int = DRAWS) -> tuple[float, float, float, float]:
    gen = torch.Generator().manual_seed(seed)
    trees, ctx = draw_trees(toy, shape, modes, draws, gen)
    rows = toy.p[ctx]  # [draws, n, V] target rows of every node
    with torch.inference_mode():
        outs = [verifier(tree, rows[i], gen) for i, tree in enumerate(trees)]
    p = toy.p.tolist()
    return emitted_stats(outs, p[0], lambda tok: p[tok + 1])


def _real(tree: DraftTree, probs: torch.Tensor, gen: torch.Generator) -> list[int]:
    return verify_sampling(tree, probs, gen).emitted


# (tree shape, draft distribution per depth, drafting mode per depth). The first emitted token
# checks the depth-1 drafts; the second, given an accepted first, checks the depth-2 drafts.
CASES = [
    ([1, 1], ("random", "disjoint"), ("iid", "iid")),  # chain: q random, then q disjoint from p
    ([1, 1], ("same", "near"), ("iid", "iid")),        # chain: q == p, then q close to p
    ([1, 1], ("random", "random"), ("det", "iid")),    # chain: one-hot, then q random
    ([3, 2], ("random", "disjoint"), ("iid", "iid")),  # i.i.d. siblings (duplicates kept)
    ([3, 2], ("random", "random"), ("det", "det")),    # distinct deterministic siblings
    ([4, 1], ("random", "same"), ("mixed", "iid")),    # fixed, its duplicate, 2 i.i.d.; q == p
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_sampling_is_lossless(case: int) -> None:
    shape, drafts, modes = CASES[case]
    s1, c1, s2, c2 = run_toy(Toy(case, drafts), shape, modes, _real, seed=1000 + case)
    assert s1 < c1, f"first token: chi2 {s1:.1f} >= {c1:.1f}"
    assert s2 < c2, f"second token: chi2 {s2:.1f} >= {c2:.1f}"
    assert c2 < math.inf, "the second-token check saw too few accepted drafts"


# ----------------------------------------------------------------------------- negative controls

def _wrong(bug: str, seed: int) -> Verifier:
    """A deliberately wrong verifier in plain Python (its own RNG; `gen` is unused).

    "no_ratio": accept a draft whenever the target allows it (p[x] > 0), ignoring min(1, p/q).
    "no_residual": the right acceptance rule, but a rejection keeps p instead of max(p - q, 0).
    """
    rng = random.Random(seed)

    def run(tree: DraftTree, probs: torch.Tensor, gen: torch.Generator) -> list[int]:
        rows, out, node = probs.tolist(), [], 0
        while True:
            p, nxt = rows[node], None
            for c in tree.children[node]:
                q, x = tree.draft_probs[c], tree.tokens[c]
                ratio = 1.0 if bug == "no_ratio" else p[x] / (1.0 if q is None else float(q[x]))
                if p[x] > 0 and rng.random() < ratio:
                    nxt = c
                    break
            if nxt is None:
                return [*out, rng.choices(range(V), weights=p)[0]]
            out.append(tree.tokens[nxt])
            node = nxt

    return run


@pytest.mark.parametrize("bug,case", [("no_ratio", 0), ("no_residual", 0), ("no_residual", 2),
                                      ("no_residual", 3)])
def test_wrong_verifiers_fail_the_same_check(bug: str, case: int) -> None:
    shape, drafts, modes = CASES[case]
    s1, c1, s2, c2 = run_toy(Toy(case, drafts), shape, modes, _wrong(bug, case), seed=1000 + case)
    assert s1 >= c1 or s2 >= c2, f"no power: chi2 {s1:.1f} < {c1:.1f} and {s2:.1f} < {c2:.1f}"


# ----------------------------------------------------------------------------- edge cases

def test_seeded_repeatability_and_valid_paths() -> None:
    toy = Toy(7, ("random", "random"))
    trees, ctx = draw_trees(toy, [3, 2], ("mixed", "iid"), 300, torch.Generator().manual_seed(0))
    rows = toy.p[ctx]

    def run(seed: int) -> list[Acceptance]:
        gen = torch.Generator().manual_seed(seed)
        return [verify_sampling(tree, rows[i], gen) for i, tree in enumerate(trees)]

    first, again, other = run(1), run(1), run(2)
    assert first == again
    assert first != other
    for tree, acc, r in zip(trees, first, rows):
        assert acc.path[0] == 0
        assert all(tree.parents[b] == a for a, b in zip(acc.path, acc.path[1:]))
        assert acc.tokens == [tree.tokens[i] for i in acc.path[1:]]
        assert all(r[tree.parents[i], tree.tokens[i]] > 0 for i in acc.path[1:])
        assert r[acc.path[-1], acc.bonus] > 0
    params = SamplingParams(temperature=0.9, seed=123)
    logits = torch.log(rows[0])
    assert (verify(trees[0], logits, params, params.generator())
            == verify(trees[0], logits, params, params.generator()))


def test_one_hot_tensor_draft_equals_deterministic_draft() -> None:
    """A draft given as an explicit one-hot q must behave exactly like draft_probs None."""
    toy = Toy(3, ("random", "random"))
    trees, ctx = draw_trees(toy, [3, 2], ("det", "det"), 300, torch.Generator().manual_seed(0))
    rows = toy.p[ctx]
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for tree, r in zip(trees, rows):
        onehot = [None] + [torch.nn.functional.one_hot(torch.tensor(t), V).float()
                           for t in tree.tokens[1:]]
        as_tensor = DraftTree(tokens=tree.tokens, parents=tree.parents, draft_probs=onehot)
        assert verify_sampling(as_tensor, r, g1) == verify_sampling(tree, r, g2)


def test_sampling_root_only_tree_draws_the_bonus_from_the_root() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    seen = set()
    for seed in range(50):
        acc = verify_sampling(DraftTree.chain(3, []), probs, torch.Generator().manual_seed(seed))
        assert acc.path == [0] and acc.tokens == []
        seen.add(acc.bonus)
    assert seen == {1, 2}


def test_degenerate_residual_accepts_instead_of_sampling_noise() -> None:
    # Target row is half the draft (unnormalised): accepted when u < 0.5; a rejection leaves
    # max(p - q, 0) == 0, which must not produce NaN or a division by zero.
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    tree = DraftTree(tokens=[0, 2], parents=[-1, 0], draft_probs=[None, q])
    probs = torch.stack([0.5 * q, q])
    for seed in range(200):
        assert verify_sampling(tree, probs, torch.Generator().manual_seed(seed)).tokens == [2]


def test_degenerate_residual_never_leaves_the_target_support() -> None:
    # The drafted token has p == 0 and the residual is empty: the bonus comes from p itself.
    q = torch.full((4,), 0.25)
    tree = DraftTree(tokens=[0, 3, 3], parents=[-1, 0, 0], draft_probs=[None, q, q])
    probs = torch.stack([torch.tensor([0.25, 0.25, 0.25, 0.0]), q, q])
    bonuses = set()
    for seed in range(300):
        acc = verify_sampling(tree, probs, torch.Generator().manual_seed(seed))
        assert acc.tokens == [] and acc.bonus in (0, 1, 2)
        bonuses.add(acc.bonus)
    assert bonuses == {0, 1, 2}


def test_large_vocab_rounding_level_differences_accept_everything() -> None:
    vocab, n = 152_064, 64
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits.double(), -1).float()  # target
    q = torch.softmax(logits, -1)  # the draft's float32 softmax: equal up to rounding
    gen = torch.Generator().manual_seed(0)
    toks = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(n - 1)]
    tree = DraftTree(tokens=[5, *toks], parents=list(range(-1, n - 1)),
                     draft_probs=[None, *q[: n - 1].unbind(0)])
    acc = verify_sampling(tree, p, gen)
    assert acc.path == list(range(n)) and acc.tokens == toks and p[n - 1, acc.bonus] > 0
    # Deterministic siblings at the root, none of them likely: the bonus follows the residual.
    det = DraftTree(tokens=[5, *p[0].argsort()[:3].tolist()], parents=[-1, 0, 0, 0])
    acc = verify_sampling(det, p[:4], gen)
    assert acc.bonus not in det.tokens[1:] or acc.tokens


# ----------------------------------------------------------------------------- top-k / top-p

def _reference_probs(logits: list[float], params: SamplingParams) -> list[float]:
    """Temperature, then top-k, then top-p (smallest prefix reaching top_p), by hand."""
    z = [x / params.temperature for x in logits]
    keep = sorted(range(len(z)), key=lambda i: -z[i])[: params.top_k or len(z)]
    m = max(z)
    e = {i: math.exp(z[i] - m) for i in keep}
    probs = {i: v / sum(e.values()) for i, v in e.items()}
    kept, mass = [], 0.0
    for i in sorted(probs, key=lambda i: -probs[i]):
        kept.append(i)
        mass += probs[i]
        if mass >= params.top_p:
            break
    total = sum(probs[i] for i in kept)
    return [probs[i] / total if i in kept else 0.0 for i in range(len(z))]


def test_top_k_top_p_match_plain_sampling() -> None:
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.8)
    draws = 50_000
    toy = Toy(11, ("random", "random"))  # only its drafts q are used here
    table = torch.randn(toy.q.shape[0], V, generator=torch.Generator().manual_seed(5)) * 1.5
    ref = [_reference_probs(row, params) for row in table.tolist()]
    assert torch.allclose(target_probs(table, params), torch.tensor(ref), atol=1e-5)
    gen = torch.Generator().manual_seed(99)
    trees, ctx = draw_trees(toy, [1, 1], ("iid", "iid"), draws, gen)
    logits = table[ctx]  # [draws, n, V]
    with torch.inference_mode():
        outs = [verify(tree, logits[i], params, gen).emitted for i, tree in enumerate(trees)]
    s1, c1, s2, c2 = emitted_stats(outs, ref[0], lambda tok: ref[tok + 1])
    assert s1 < c1 and s2 < c2, (s1, c1, s2, c2)
    # Two-sample check against plain sampling of the same distribution.
    plain = sample(target_probs(table[:1], params).expand(draws, V), gen).tolist()
    a, b = [0] * V, [0] * V
    for out, t in zip(outs, plain):
        a[out[0]] += 1
        b[t] += 1
    cells = [(x, y) for x, y in zip(a, b) if x + y]
    stat = sum((x - y) ** 2 / (x + y) for x, y in cells)
    assert stat < chi2_critical(len(cells) - 1), (a, b)
