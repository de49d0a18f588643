"""LLaVA-Scissor: merge the connected components of a token-similarity graph, per frame then across frames.

Paper: Sun et al., "LLaVA-Scissor: Token Compression with Semantic Connected Components for Video
LLMs", 2025. Reference: ``HumanMLLM/LLaVA-Scissor`` @ ``b63354c81e55c82e5d48ced3c993454183b79425``,
``llava/model/llava_arch_zip.py::{UnionFind, approximate_components}`` and the ``mm_use_zip`` block of
``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`` (config ``mm_zip_tau``, ``mm_zip_epsilon``).

Algorithm (``X`` = the video's ``(T, n, D)`` projector tokens):

1. spatial: per frame, the graph ``cos(x_i, x_j) > tau`` (self loops included); each connected
   component becomes the mean of its tokens. ``S1`` = these means, frame by frame.
2. temporal: the same on ``S1`` as one set (unweighted means of the step-1 means). ``S2``.
3. every original token joins the ``S2`` token it is most similar to (cosine, ties to the lower
   index); output ``j`` = ``(S2_j + sum of its tokens) / (count_j + 1)``.

Components are ordered by their key node: the member of highest degree in the thresholded graph
(ties to the lower index), in ascending index order.

Determinism, and how the result relates to the reference's. The reference samples
``s = min(m, ceil(ln(m) / epsilon**2))`` nodes with ``np.random.choice`` and unions each sampled node
with its neighbours; then it collects each component as the nodes whose *raw* union-find parent is
the root. tokcompress computes exact connected components of the graph restricted to the edges of the
sampled nodes, with ``find`` semantics: when ``s = m`` (every call with ``m <= 3,300`` at the default
``epsilon = 0.05``) that is exactly the graph's connected components, the reference's result whenever
its raw-parent rule drops no node (a node two levels below its root falls out of every component,
depending on the random union order; none of the golden cases hits this, each was checked under
several numpy seeds). When ``s < m`` the sampled nodes are drawn by a ``torch.Generator`` seeded with
``seed``, so results are repeatable but follow a different random stream than numpy's.

Each output token takes the position of its key node's key node (the highest-degree token of the
highest-degree step-1 component), which keeps the outputs in the reference's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..budget import fit_threshold
from ..policy import Policy, check_positions, check_retain, keep_count
from ..registry import register
from ..tokens import Compression, TokenSet, selection


def connected_components(adj: Tensor) -> Tensor:
    """Connected components of symmetric graphs (hook-and-compress over the edge list).

    Args:
        adj: ``(..., m, m)`` bool adjacency, symmetric (self loops allowed, not needed).

    Returns:
        ``(..., m)`` int64: for each node, the smallest node index of its component.
    """
    m = adj.shape[-1]
    batch = adj.shape[:-2]
    if m == 0 or adj.numel() == 0:
        return torch.zeros(adj.shape[:-1], dtype=torch.long, device=adj.device)
    flat = adj.reshape(-1, m, m)
    b, src, dst = flat.nonzero(as_tuple=True)
    src, dst = src + b * m, dst + b * m
    root = torch.arange(flat.shape[0] * m, device=adj.device)
    while True:
        # each tree hooks its root under the smallest root among its members' neighbours ...
        neighbour = root.scatter_reduce(0, src, root[dst], "amin")
        parent = root.scatter_reduce(0, root, neighbour, "amin")
        # ... then every node follows its pointers to the new root (only ever to smaller indices)
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
        new = parent[root]
        if torch.equal(new, root):
            break
        root = new
    offset = (torch.arange(flat.shape[0], device=adj.device) * m)[:, None]
    return (root.reshape(-1, m) - offset).reshape(*batch, m)


def _sample_size(m: int, epsilon: float) -> int:
    """The reference's ``min(m, int(ceil(ln(m) / epsilon**2)))``."""
    return 0 if m <= 1 else min(m, int(math.ceil(math.log(m) / epsilon**2)))


def _restrict_to_sample(adj: Tensor, nodes: Tensor, epsilon: float, generator: torch.Generator) -> Tensor:
    """Keep only the edges that touch a sampled node of ``nodes`` (all edges when every node is sampled)."""
    m = nodes.numel()
    s = _sample_size(m, epsilon)
    if s >= m:
        return adj
    sampled = torch.zeros(adj.shape[-1], dtype=torch.bool, device=adj.device)
    sampled[nodes[torch.randperm(m, generator=generator)[:s].to(nodes.device)]] = True
    return adj & (sampled[:, None] | sampled[None, :])


@dataclass
class Components:
    """Ordered components of a token set.

    Attributes:
        label: ``(m,)`` int64 component of each node (index into the ordered components), -1 for
            nodes that take no part (unavailable tokens).
        key: ``(K,)`` int64 key node of each component, ascending.
        means: ``(K, D)`` float32 mean of each component's members.
    """

    label: Tensor
    key: Tensor
    means: Tensor


def ordered_components(x: Tensor, adj: Tensor, used: Tensor, member: Tensor) -> Components:
    """Components of ``used`` (an edge subset of ``adj``), ordered by key node as the reference does.

    Args:
        x: ``(m, D)`` float32 tokens.
        adj: ``(m, m)`` bool thresholded similarity (gives the degrees).
        used: ``(m, m)`` bool edges that connect nodes (``adj``, or its sampled part).
        member: ``(m,)`` bool nodes that take part.
    """
    m = x.shape[0]
    device = x.device
    idx = torch.arange(m, device=device)
    root = connected_components(used)
    degree = torch.count_nonzero(adj, dim=-1)
    # key = highest degree, ties to the lowest index: maximise degree * (m + 1) + (m - index)
    code = torch.where(member, degree * (m + 1) + (m - idx), torch.full_like(degree, -1))
    best = torch.full((m,), -1, dtype=code.dtype, device=device).scatter_reduce(0, root, code, "amax")
    roots = ((root == idx) & member).nonzero().squeeze(1)
    key_of_root = m - best[roots] % (m + 1)
    order = torch.argsort(key_of_root)
    rank = torch.full((m,), -1, dtype=torch.long, device=device)
    rank[roots[order]] = torch.arange(roots.numel(), device=device)
    label = torch.where(member, rank[root], torch.full_like(root, -1))
    key = key_of_root[order]
    return Components(label, key, _group_means(x, label, roots.numel()))


def _group_means(x: Tensor, label: Tensor, k: int) -> Tensor:
    ok = label >= 0
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, label[ok], x[ok])
    counts = torch.bincount(label[ok], minlength=k).to(x.dtype)
    return sums / counts[:, None]


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@dataclass
class ScissorResult:
    """Everything LLaVA-Scissor computes for one video.

    Attributes:
        tokens: ``(K, D)`` float32 output tokens, in the reference's order.
        keep: ``(K,)`` int64 flat index (``t * n + i``) of the original token each output takes the
            position of (the key node of its key step-1 component), ascending.
        assign: ``(T * n,)`` int64 output token each original token was added to (-1 unavailable).
        s1_label: ``(T * n,)`` int64 step-1 component of each token (index into ``S1``; -1 unavailable).
        s1_counts: ``(T,)`` int64 step-1 components per frame.
        s2_label: ``(M,)`` int64 step-2 component (= output token) of each ``S1`` token.
    """

    tokens: Tensor
    keep: Tensor
    assign: Tensor
    s1_label: Tensor
    s1_counts: Tensor
    s2_label: Tensor


def _spatial_similarity(xn: Tensor, avail: Tensor) -> Tensor:
    """``(T, n, n)`` per-frame cosine similarity; pairs with an unavailable token are set to -inf."""
    sim = xn @ xn.transpose(1, 2)
    return sim.masked_fill(~(avail[:, :, None] & avail[:, None, :]), float("-inf"))


def scissor(
    features: Tensor, tau: float, epsilon: float = 0.05, available: Tensor | None = None, seed: int = 0
) -> ScissorResult:
    """LLaVA-Scissor's three steps on one video.

    Args:
        features: ``(T, n, D)`` tokens (computed in float32).
        tau: cosine threshold, edge iff ``cos > tau``.
        epsilon: sampling tolerance of the reference's approximate components.
        available: ``(T, n)`` bool tokens present (None: all).
        seed: seeds the node sampling, used only when a set is larger than ``ln(m) / epsilon**2``.
    """
    t, n, d = features.shape
    x = features.float()
    avail = torch.ones(t, n, dtype=torch.bool, device=x.device) if available is None else available.to(x.device)
    gen = torch.Generator().manual_seed(seed)
    adj = _spatial_similarity(_unit(x), avail) > tau
    return _scissor_from_spatial(x, adj, avail, tau, epsilon, gen)


def _scissor_from_spatial(
    x: Tensor, adj: Tensor, avail: Tensor, tau: float, epsilon: float, gen: torch.Generator, count_only: bool = False
) -> ScissorResult | int:
    t, n, d = x.shape
    device = x.device
    flat = x.reshape(t * n, d)
    # step 1: per-frame components, numbered globally so one sort orders frames then key nodes
    degree = torch.count_nonzero(adj, dim=-1)
    if n > 1 and _sample_size(n, epsilon) < n:  # frames large enough for the reference to sample nodes
        adj = torch.stack([_restrict_to_sample(adj[f], avail[f].nonzero().squeeze(1), epsilon, gen) for f in range(t)])
    s1_root = connected_components(adj) + torch.arange(t, device=device)[:, None] * n
    idx = torch.arange(t * n, device=device)
    member = avail.reshape(-1)
    root = s1_root.reshape(-1)
    code = torch.where(member, degree.reshape(-1) * (t * n + 1) + (t * n - idx), torch.full_like(idx, -1))
    best = torch.full((t * n,), -1, dtype=code.dtype, device=device).scatter_reduce(0, root, code, "amax")
    roots = ((root == idx) & member).nonzero().squeeze(1)
    s1_key = t * n - best[roots] % (t * n + 1)
    order = torch.argsort(s1_key)
    rank = torch.full((t * n,), -1, dtype=torch.long, device=device)
    rank[roots[order]] = torch.arange(roots.numel(), device=device)
    s1_label = torch.where(member, rank[root], torch.full_like(root, -1))
    s1_key = s1_key[order]
    s1 = _group_means(flat, s1_label, roots.numel())

    # step 2: the same on S1 as one set
    s1n = _unit(s1)
    adj2 = (s1n @ s1n.T) > tau
    used2 = _restrict_to_sample(adj2, torch.arange(s1.shape[0], device=device), epsilon, gen)
    s2 = ordered_components(s1, adj2, used2, torch.ones(s1.shape[0], dtype=torch.bool, device=device))
    if count_only:
        return int(s2.key.numel())

    # step 3: every original token joins its most similar S2 token
    assign = torch.full((t * n,), -1, dtype=torch.long, device=device)
    assign[member] = torch.argmax(_unit(flat[member]) @ _unit(s2.means).T, dim=1)
    k = s2.key.numel()
    sums = s2.means.clone().index_add_(0, assign[member], flat[member])
    counts = torch.bincount(assign[member], minlength=k).to(flat.dtype) + 1
    return ScissorResult(
        tokens=sums / counts[:, None],
        keep=s1_key[s2.key],
        assign=assign,
        s1_label=s1_label,
        s1_counts=torch.bincount(s1_key // n, minlength=t),
        s2_label=s2.label,
    )


def fit_tau(features: Tensor, budget: int, epsilon: float = 0.05, available: Tensor | None = None, seed: int = 0) -> float:
    """The ``tau`` (bisection over ``[-1, 1]``) whose output count is the largest found that is ``<= budget``."""
    t, n, d = features.shape
    x = features.float()
    avail = torch.ones(t, n, dtype=torch.bool, device=x.device) if available is None else available.to(x.device)
    sim = _spatial_similarity(_unit(x), avail)  # thresholds change, similarities do not

    def count(tau: float) -> int:
        gen = torch.Generator().manual_seed(seed)
        return int(_scissor_from_spatial(x, sim > tau, avail, tau, epsilon, gen, count_only=True))

    return fit_threshold(count, budget, -1.0, 1.0, steps=SEARCH_STEPS)


#: Bisection steps of the ``retain`` search (``tau`` to within ``2 / 2**14``).
SEARCH_STEPS = 14


#: The reference README's default threshold.
DEFAULT_TAU = 0.9


@register("llava_scissor")
@dataclass
class LlavaScissor(Policy):
    """LLaVA-Scissor (semantic connected components), a merging policy.

    Args:
        retain: ``None`` (default) lets ``tau`` decide how many tokens remain, as the reference does.
            A fraction instead searches ``tau`` per video (bisection) for the largest output count
            that is at most ``keep_count(retain, N)``; ``retain=1.0`` keeps every token unmerged.
        tau: cosine threshold [``mm_zip_tau``]; ``None`` means 0.9 (README default) unless ``retain``
            is set. Pass either ``tau`` or ``retain``, not both.
        epsilon: sampling tolerance [``mm_zip_epsilon``], in ``(0, 1]``.
        seed: seeds the node sampling of sets larger than ``ln(m) / epsilon**2`` (see the module notes).
        positions: ``"kept"`` (default: survivors keep their original position ids) or ``"compacted"``
            (renumbered consecutively, as the reference does; 1-D positions only).

    Output tokens are means and take the position of a member token (``last_record``: ``keep``);
    ``assign`` maps each original token to the output it was averaged into. Works on any family (no
    signals); each video is one set. The reference numbers the merged tokens consecutively;
    ``positions="compacted"`` does the same (1-D positions).
    """

    retain: float | None = None  # type: ignore[assignment]
    tau: float | None = None
    epsilon: float = 0.05
    seed: int = 0
    positions: str = "kept"

    accepts_partial: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_positions(self.positions)
        if self.retain is not None:
            self.retain = check_retain(self.retain)
            if self.tau is not None:
                raise ValueError("pass either tau (the reference's threshold) or retain (a token budget), not both")
        if self.tau is not None and (isinstance(self.tau, bool) or not isinstance(self.tau, (int, float))):
            raise ValueError(f"tau must be a cosine threshold (a float, usually in (0, 1)); got {self.tau!r}")
        if self.tau is not None and not -1.0 <= float(self.tau) <= 1.0:
            raise ValueError(f"tau must be a cosine threshold in [-1, 1]; got {self.tau!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon must be in (0, 1]; got {self.epsilon!r}")

    @property
    def label(self) -> str:
        if self.retain is not None:
            return f"{self.name}(retain={self.retain:g})"
        return f"{self.name}(tau={self.threshold:g})"

    @property
    def threshold(self) -> float:
        return DEFAULT_TAU if self.tau is None else float(self.tau)

    def compress(self, tokens: TokenSet) -> Compression:
        if self.retain == 1.0:
            return selection(tokens.available_index(), info={"tau": None})
        tau = self.threshold
        if self.retain is not None:
            budget = keep_count(self.retain, tokens.num_available)
            tau = fit_tau(tokens.features, budget, self.epsilon, tokens.available, self.seed)
        res = scissor(tokens.features, tau, self.epsilon, tokens.available, self.seed)
        info = {"tau": tau, "s1_counts": res.s1_counts.tolist(), "steps": (int(res.s1_label.max()) + 1, res.keep.numel())}
        return Compression(
            keep=res.keep, values=res.tokens.to(tokens.features.dtype), assign=res.assign, info=info
        )
