"""Questions for the ``walk`` task: a walk over a small non-abelian group whose answer loss along
the trajectory has a closed-form reference.

A question is S symbols ``c_1 … c_S``, each uniform over the elements of a group G (``"S3"``, the
6 permutations of 3 items, by default; ``"A5"``, the 60 even permutations of 5, the hard setting).
Two states move along::

    q_0 = e,  q_k = q_{k−1} · c_k              (composition in G)
    r_0 = 0,  r_k = r_{k−1} + 1 if q_k ∈ U else r_{k−1} − 1

where U is a fixed third of G (:attr:`Group.upper`). The answer is r_S ∈ [−S, S].

As tokens (one vocabulary per group and maximum length, :class:`Vocabulary`)::

    prompt      <bos> Q: c_1 … c_S T:                      S + 3 tokens
    entry       s{k} g{c_k} g{q_k} n{r_k}                  ENTRY_TOKENS = 4 tokens (after step k)
    answer      A: n{r_S} <eos>

The canonical trajectory writes an entry after every step (S entries); another valid trajectory
groups the steps, writing after one or two symbols at a time (:func:`sample_groupings`); every
entry names its step k, so a grouped trajectory is unambiguous. An entry restates the symbol it
read last (c_k), as the ``reasoning`` task's steps restate their operands: the composition
q_{k−1} · c_k then reads two nearby tokens instead of a symbol far back in the question (a
grouped entry restates only the last of its two symbols; the other is in the question).

The reference without look-ahead (:func:`no_lookahead_entropy`): as c_k is uniform, q_k is uniform
and independent of q_{k−1}, so every step goes up with probability 1/3 independently of the past.
Given the trajectory up to step k and nothing of the symbols after it, r_S − r_k is a sum of S − k
independent ±1 steps with P(+1) = 1/3, and the least achievable answer loss is the entropy of
Binomial(S − k, 1/3), in nats.

Everything random draws from the ``torch.Generator`` passed in, never from the global RNG.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch
from torch import Tensor

GROUPS = ("S3", "A5")
ENTRY_TOKENS = 4
SPECIALS = ["<pad>", "<bos>", "<eos>", "Q:", "T:", "A:"]
PAD, BOS, EOS, QUESTION, TRAJECTORY, ANSWER = range(len(SPECIALS))
# U is drawn once, from this seed, so it is the same third in every run.
UPPER_SEED = 0


@dataclasses.dataclass(frozen=True)
class Group:
    """A finite group as permutations: ``table[a, b]`` is the index of ``a · b``, where
    ``(a · b)(i) = a(b(i))``; element 0 is the identity. ``upper`` ``[|G|]`` bool marks U, a fixed
    third of G that is not a subgroup nor a coset of one."""

    name: str
    elements: tuple
    table: Tensor
    upper: Tensor

    @property
    def order(self) -> int:
        return len(self.elements)


def _is_even(perm) -> bool:
    inversions = sum(perm[i] > perm[j] for i in range(len(perm)) for j in range(i + 1, len(perm)))
    return inversions % 2 == 0


@functools.lru_cache(maxsize=None)
def group(name: str) -> Group:
    """``"S3"`` (order 6) or ``"A5"`` (order 60)."""
    if name == "S3":
        elements = list(itertools.permutations(range(3)))
    elif name == "A5":
        elements = [p for p in itertools.permutations(range(5)) if _is_even(p)]
    else:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {name!r}")
    index = {p: i for i, p in enumerate(elements)}   # lexicographic: the identity is first
    table = torch.tensor([[index[tuple(a[b[i]] for i in range(len(a)))] for b in elements]
                          for a in elements], dtype=torch.int64)
    n = len(elements)
    generator = torch.Generator().manual_seed(UPPER_SEED)
    while True:
        chosen = torch.randperm(n, generator=generator)[:n // 3]
        upper = torch.zeros(n, dtype=torch.bool)
        upper[chosen] = True
        if not _is_coset(table, upper):
            break
    return Group(name, tuple(elements), table, upper)


def _is_coset(table: Tensor, subset: Tensor) -> bool:
    """Whether ``subset`` is a left coset ``gH`` of a subgroup H (a subgroup is its own coset)."""
    members = subset.nonzero()[:, 0]
    g = int(members[0])
    inverse = int((table[g] == 0).nonzero()[0, 0])
    h = torch.zeros_like(subset)
    h[table[inverse, members]] = True                   # g⁻¹ · subset
    h_members = h.nonzero()[:, 0]
    closed = h[table[h_members][:, h_members]].all()     # H · H ⊆ H
    return bool(closed)


class Vocabulary:
    """The tokens of the walk task over ``group`` with questions of at most ``max_length`` symbols:
    the specials, ``g0 … g{|G|−1}`` (elements), ``n{−L} … n{L}`` (positions) and ``s0 … s{L}``
    (step indices)."""

    def __init__(self, group_name: str, max_length: int) -> None:
        _positive_int("max_length", max_length)
        self.group = group(group_name)
        self.max_length = max_length
        self.element0 = len(SPECIALS)
        self.position0 = self.element0 + self.group.order + max_length   # n{r} = position0 + r
        self.step0 = self.position0 + max_length + 1                       # s{k} = step0 + k
        self.size = self.step0 + max_length + 1

    def tokens(self) -> list[str]:
        return (SPECIALS + [f"g{i}" for i in range(self.group.order)]
                + [f"n{r}" for r in range(-self.max_length, self.max_length + 1)]
                + [f"s{k}" for k in range(self.max_length + 1)])

    def decode(self, ids) -> str:
        names = self.tokens()
        return " ".join(names[i] for i in torch.as_tensor(ids).reshape(-1).tolist())


@dataclasses.dataclass
class WalkBatch:
    """B questions of S symbols (int64).

    symbols:   ``[B, S]`` element indices c_1 … c_S
    states:    ``[B, S]`` q_1 … q_S
    positions: ``[B, S]`` r_1 … r_S (the last is the answer)
    """

    symbols: Tensor
    states: Tensor
    positions: Tensor

    @property
    def answer(self) -> Tensor:
        """``[B]`` r_S."""
        return self.positions[:, -1]

    @property
    def length(self) -> int:
        return self.symbols.shape[1]


def walk(group_name: str, symbols: Tensor, start: Tensor | None = None,
         position: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(states [B, S], positions [B, S])`` of the walk over ``symbols [B, S]`` from ``start``
    (default e) and ``position`` (default 0), each ``[B]``."""
    g = group(group_name)
    batch, steps = symbols.shape
    q = torch.zeros(batch, dtype=torch.int64) if start is None else start
    r = torch.zeros(batch, dtype=torch.int64) if position is None else position
    states, positions = [], []
    for k in range(steps):
        q = g.table[q, symbols[:, k]]
        r = r + torch.where(g.upper[q], 1, -1)
        states.append(q)
        positions.append(r)
    empty = symbols.new_zeros(batch, 0)
    return (torch.stack(states, 1) if states else empty,
            torch.stack(positions, 1) if positions else empty)


def sample_questions(batch_size: int, length: int, *, group_name: str = "S3",
                     generator: torch.Generator) -> WalkBatch:
    """``batch_size`` questions of ``length`` uniform symbols, with their walks."""
    _positive_int("batch_size", batch_size)
    _positive_int("length", length)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    g = group(group_name)
    symbols = torch.randint(0, g.order, (batch_size, length), generator=generator)
    states, positions = walk(group_name, symbols)
    return WalkBatch(symbols, states, positions)


def corrupt(batch: WalkBatch, group_name: str, *, generator: torch.Generator,
            step: Tensor | None = None) -> tuple[WalkBatch, Tensor]:
    """One state made wrong and the walk continued from it: at step ``j`` (``[B]``, drawn uniformly
    from 1 … S when None) the move goes the other way (r_j off by 2) and q_j becomes a uniformly
    drawn element on the other side of U, consistent with that move; steps after j follow the
    rule from the wrong (q_j, r_j) on the question's own symbols. The symbols, hence the true
    answer, are unchanged. Returns the corrupted walk (its ``positions[:, -1]`` is the
    trajectory's wrong end, not the answer) and ``step``."""
    g = group(group_name)
    batch_size, length = batch.symbols.shape
    if step is None:
        step = 1 + torch.randint(0, length, (batch_size,), generator=generator)
    step = torch.as_tensor(step, dtype=torch.int64).expand(batch_size)
    if bool(((step < 1) | (step > length)).any()):
        raise ValueError(f"step must be in [1, {length}], got {step.unique().tolist()}")
    states, positions = batch.states.clone(), batch.positions.clone()
    rows = torch.arange(batch_size)
    true_q = batch.states[rows, step - 1]
    # a uniform element of the other side of U (the largest of uniform scores over that side)
    other_side = g.upper[None, :] != g.upper[true_q][:, None]         # [B, |G|]
    scores = torch.rand(batch_size, g.order, generator=generator)
    wrong_q = scores.masked_fill(~other_side, -1.0).argmax(1)
    previous_r = torch.where(step > 1, batch.positions[rows, (step - 2).clamp(min=0)], 0)
    wrong_r = previous_r + torch.where(g.upper[wrong_q], 1, -1)
    states[rows, step - 1], positions[rows, step - 1] = wrong_q, wrong_r
    for k in range(1, length):          # continue the walk after the corrupted step
        after = step <= k
        q = g.table[states[:, k - 1], batch.symbols[:, k]]
        r = positions[:, k - 1] + torch.where(g.upper[q], 1, -1)
        states[:, k] = torch.where(after, q, states[:, k])
        positions[:, k] = torch.where(after, r, positions[:, k])
    return WalkBatch(batch.symbols, states, positions), step


def no_lookahead_entropy(length: int, up: float = 1 / 3) -> list[float]:
    """``[H_0, …, H_S]``: H_k the entropy in nats of Binomial(S − k, up), the least answer loss of
    a calibrated model that knows (q_k, r_k) and nothing of the symbols after step k. Exact (a sum
    over the binomial's support in float64)."""
    _positive_int("length", length)
    values = []
    for k in range(length + 1):
        n = length - k
        entropy = 0.0
        for i in range(n + 1):
            p = math.comb(n, i) * up ** i * (1 - up) ** (n - i)
            if p > 0:
                entropy -= p * math.log(p)
        values.append(entropy)
    return values


def sample_groupings(length: int, count: int, *, generator: torch.Generator,
                     canonical_first: bool = True) -> list[tuple[int, ...]]:
    """``count`` distinct groupings of ``length`` steps: each the increasing steps k after which
    an entry is written, ending with ``length``; consecutive entries 1 or 2 steps apart. The first
    is the canonical ``(1, 2, …, S)`` with ``canonical_first``. ValueError if fewer than ``count``
    groupings exist (Fibonacci(S + 1))."""
    total = _fibonacci(length + 1)
    if count > total:
        raise ValueError(f"count={count} distinct groupings asked, but {length} steps have only "
                         f"{total}")
    found: list[tuple[int, ...]] = [tuple(range(1, length + 1))] if canonical_first else []
    while len(found) < count:
        steps, k = [], 0
        while k < length:
            k = min(length, k + 1 + int(torch.randint(0, 2, (), generator=generator)))
            steps.append(k)
        if tuple(steps) not in found:
            found.append(tuple(steps))
    return found


def _fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def prompt_ids(vocab: Vocabulary, batch: WalkBatch) -> Tensor:
    """``[B, S + 3]`` ``<bos> Q: c_1 … c_S T:``."""
    b = batch.symbols.shape[0]
    return torch.cat([torch.tensor([BOS, QUESTION]).expand(b, 2), vocab.element0 + batch.symbols,
                      torch.full((b, 1), TRAJECTORY)], 1)


def entry_ids(vocab: Vocabulary, batch: WalkBatch) -> Tensor:
    """``[B, S, 4]`` the canonical trajectory's entries ``s{k} g{c_k} g{q_k} n{r_k}``, k = 1 … S."""
    b, s = batch.symbols.shape
    if s > vocab.max_length:
        raise ValueError(f"questions of {s} steps need a vocabulary of max_length >= {s}")
    steps = vocab.step0 + torch.arange(1, s + 1).expand(b, s)
    return torch.stack([steps, vocab.element0 + batch.symbols, vocab.element0 + batch.states,
                        vocab.position0 + batch.positions], -1)


def answer_token(vocab: Vocabulary, answer: Tensor) -> Tensor:
    """The token of position r (any shape)."""
    return vocab.position0 + answer


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
