"""Questions for the ``reasoning`` task: arithmetic chains modulo 10, with chain-of-thought
trajectories whose steps restate their operands, and a small fixed vocabulary.

A question with S steps is a start digit r_0 and S operations ``op_t d_t`` (op in + - *);
r_{t+1} = (r_t op_t d_t) mod 10, and the answer is r_S. As tokens::

    prompt      <bos> Q: r_0 op_1 d_1 ... op_S d_S T:                  2S + 4 tokens
    trajectory  a op b = c ;   (one step, STEP_TOKENS = 6 tokens) × S   [S, 6]
    answer      A: r_S <eos>   (``answer_ids`` holds the digit r_S; A: and <eos> are fixed)

so a step is one chunk of :class:`~metakernels.nn.FastWeightMemory` with ``chunk_size=6``.

Multipliers are the units of Z_10 (1, 3, 7, 9), so every step is a permutation of the digits:
the answer depends on every step, and a wrong intermediate result always stays wrong to the end
(with ×0 or ×5 a chain could forget its past, and a corrupted step could heal).

Several trajectories per question (the support set of the question's inner loop) are different
but correct writings of the same computation, step by step: ``r + d`` may be written ``d + r``
(commuted) or ``r - (10−d)`` (subtracting the complement); ``r - d`` as ``r + (10−d)`` or
``(10−d) + r``; ``r * d`` as ``d * r``. Trajectory 0 is always the canonical ``r op d = r'``;
the others pick a form for every step uniformly at random (so with few steps two trajectories may
coincide). Every form restates both operands and the result, all results are the true r_{t+1}.

Everything random draws from the ``torch.Generator`` passed in, never from the global RNG.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

DIGITS = [str(d) for d in range(10)]
OPS = ["+", "-", "*"]
TOKENS = ["<pad>", "<bos>", "<eos>", *DIGITS, *OPS, "=", ";", "Q:", "T:", "A:"]
TOKEN_ID = {token: i for i, token in enumerate(TOKENS)}
VOCAB_SIZE = len(TOKENS)
PAD, BOS, EOS = TOKEN_ID["<pad>"], TOKEN_ID["<bos>"], TOKEN_ID["<eos>"]
QUESTION, TRAJECTORY, ANSWER = TOKEN_ID["Q:"], TOKEN_ID["T:"], TOKEN_ID["A:"]
EQUALS, STEP_END = TOKEN_ID["="], TOKEN_ID[";"]
DIGIT0 = TOKEN_ID["0"]            # digit d is token DIGIT0 + d
OP0 = TOKEN_ID["+"]               # op code o (0 +, 1 -, 2 *) is token OP0 + o
PLUS, MINUS, TIMES = 0, 1, 2
STEP_TOKENS = 6                   # a op b = c ;
MULTIPLIERS = (1, 3, 7, 9)        # the units of Z_10


def encode(text: str | list[str]) -> Tensor:
    """Tokens separated by spaces (or a list of tokens) -> int64 ids ``[len]``."""
    if isinstance(text, str):
        text = text.split()
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"text must be a str or a list of tokens, got {type(text).__name__}")
    unknown = [t for t in text if t not in TOKEN_ID]
    if unknown:
        raise ValueError(f"text has tokens outside the vocabulary: {unknown[:5]}; the vocabulary "
                         f"is {TOKENS}")
    return torch.tensor([TOKEN_ID[t] for t in text], dtype=torch.int64)


def decode(ids: Tensor) -> str:
    """int ids (any shape, read in order) -> tokens separated by spaces; ``encode`` inverts it."""
    if not isinstance(ids, Tensor):
        ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"ids must be integer token ids, got dtype {ids.dtype}")
    flat = ids.reshape(-1).tolist()
    bad = [i for i in flat if not 0 <= i < VOCAB_SIZE]
    if bad:
        raise ValueError(f"ids has values outside [0, {VOCAB_SIZE}): {bad[:5]}")
    return " ".join(TOKENS[i] for i in flat)


def apply_op(left: Tensor, op: Tensor, right: Tensor) -> Tensor:
    """``(left op right) mod 10`` elementwise, op codes 0 +, 1 -, 2 *."""
    return torch.where(op == PLUS, left + right,
                       torch.where(op == MINUS, left - right, left * right)).remainder(10)


@dataclasses.dataclass
class ReasoningBatch:
    """B questions of S steps with K trajectories each (int64 token ids unless stated).

    prompt_ids:     ``[B, 2S + 4]`` ``<bos> Q: r_0 op_1 d_1 ... op_S d_S T:``
    trajectory_ids: ``[B, K, S, STEP_TOKENS]``, one row of 6 tokens per step; ``[B, K, 0, 6]``
                    without trajectories
    answer_ids:     ``[B, 1]`` the answer digit's token
    start:          ``[B]`` r_0;  ops ``[B, S]`` op codes;  operands ``[B, S]`` d_t
    results:        ``[B, S]`` r_1 ... r_S (the last is the answer)
    """

    prompt_ids: Tensor
    trajectory_ids: Tensor
    answer_ids: Tensor
    start: Tensor
    ops: Tensor
    operands: Tensor
    results: Tensor

    @property
    def answer(self) -> Tensor:
        """``[B]`` the answer digit r_S."""
        return self.answer_ids[:, 0] - DIGIT0

    def flat_trajectories(self, trajectory_ids: Tensor | None = None) -> Tensor:
        """``[B, K, S·6]``: the steps of each trajectory one after the other."""
        ids = self.trajectory_ids if trajectory_ids is None else trajectory_ids
        return ids.reshape(*ids.shape[:-2], ids.shape[-2] * ids.shape[-1])

    def sequences(self, trajectory: int = 0, trajectory_ids: Tensor | None = None) -> Tensor:
        """``[B, 2S + 4 + S·6 + 3]`` whole training sequences: prompt, trajectory number
        ``trajectory`` (or the given ``trajectory_ids [B, S, 6]``, e.g. corrupted), then
        ``A: r_S <eos>``."""
        steps = (self.trajectory_ids[:, trajectory] if trajectory_ids is None
                 else trajectory_ids)
        batch = self.prompt_ids.shape[0]
        tail = torch.tensor([ANSWER, EOS], dtype=torch.int64).expand(batch, 2)
        return torch.cat([self.prompt_ids, steps.reshape(batch, -1), tail[:, :1],
                          self.answer_ids, tail[:, 1:]], 1)


def sample_questions(batch_size: int, steps: int, *, generator: torch.Generator,
                     trajectories: int = 1, with_trajectory: bool = True,
                     device=None) -> ReasoningBatch:
    """Draws ``batch_size`` questions of ``steps`` operations, with ``trajectories`` trajectories
    each (trajectory 0 canonical, the others in random equivalent forms; see the module
    docstring), or none with ``with_trajectory=False``. Deterministic given ``generator``."""
    for name, value, low in (("batch_size", batch_size, 0), ("steps", steps, 1),
                             ("trajectories", trajectories, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(with_trajectory, bool):
        raise TypeError(f"with_trajectory must be a bool, got {type(with_trajectory).__name__}")

    def randint(high, *shape):
        return torch.randint(0, high, shape, generator=generator, dtype=torch.int64)

    start = randint(10, batch_size)
    ops = randint(3, batch_size, steps)
    operands = torch.where(ops == TIMES,
                           torch.tensor(MULTIPLIERS)[randint(len(MULTIPLIERS), batch_size, steps)],
                           randint(10, batch_size, steps))
    # Every form draws here, so the questions do not depend on K or on with_trajectory.
    forms = randint(6, batch_size, trajectories, steps)
    forms[:, 0] = 0

    running, results = start, []
    for t in range(steps):
        running = apply_op(running, ops[:, t], operands[:, t])
        results.append(running)
    results = torch.stack(results, 1) if results else start.new_zeros(batch_size, 0)

    prompt = torch.empty(batch_size, 2 * steps + 4, dtype=torch.int64)
    prompt[:, 0], prompt[:, 1], prompt[:, 2], prompt[:, -1] = BOS, QUESTION, DIGIT0 + start, \
        TRAJECTORY
    prompt[:, 3:-1:2] = OP0 + ops
    prompt[:, 4:-1:2] = DIGIT0 + operands

    if with_trajectory:
        previous = torch.cat([start[:, None], results[:, :-1]], 1)[:, None].expand(
            -1, trajectories, -1)
        left, op, right = _written_forms(previous, ops[:, None].expand_as(previous),
                                         operands[:, None].expand_as(previous), forms)
        trajectory = _step_tokens(left, op, right,
                                  results[:, None].expand_as(previous))
    else:
        trajectory = torch.empty(batch_size, trajectories, 0, STEP_TOKENS, dtype=torch.int64)
    answer_ids = (DIGIT0 + results[:, -1:]).clone()
    batch = ReasoningBatch(prompt, trajectory, answer_ids, start, ops, operands, results)
    if device is not None:
        batch = ReasoningBatch(*(getattr(batch, f.name).to(device)
                                 for f in dataclasses.fields(batch)))
    return batch


def _written_forms(running: Tensor, op: Tensor, digit: Tensor, form: Tensor):
    """The operands and op a step is written with: form in [0, 6), reduced modulo the number of
    forms of the op (3 for + and -, 2 for *), 0 canonical."""
    complement = (10 - digit).remainder(10)
    left, right, written = running.clone(), digit.clone(), op.clone()
    plus, minus, times = op == PLUS, op == MINUS, op == TIMES
    f3, f2 = form % 3, form % 2
    # r + d:  d + r | r - (10-d)
    swap = plus & (f3 == 1)
    left[swap], right[swap] = digit[swap], running[swap]
    sub = plus & (f3 == 2)
    right[sub], written[sub] = complement[sub], MINUS
    # r - d:  r + (10-d) | (10-d) + r
    add = minus & (f3 == 1)
    right[add], written[add] = complement[add], PLUS
    add_swap = minus & (f3 == 2)
    left[add_swap], right[add_swap], written[add_swap] = complement[add_swap], running[add_swap], \
        PLUS
    # r * d:  d * r
    swap = times & (f2 == 1)
    left[swap], right[swap] = digit[swap], running[swap]
    return left, written, right


def _step_tokens(left: Tensor, op: Tensor, right: Tensor, result: Tensor) -> Tensor:
    """``[..., 6]`` the tokens ``left op right = result ;``."""
    equals = torch.full_like(left, EQUALS)
    end = torch.full_like(left, STEP_END)
    return torch.stack([DIGIT0 + left, OP0 + op, DIGIT0 + right, equals, DIGIT0 + result, end],
                       -1)


def parse_steps(trajectory_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``[..., S, 6]`` step tokens -> (left, op, right, result) digits/op codes, each
    ``[..., S]``; ValueError if a step is not ``digit op digit = digit ;``."""
    _check_trajectory(trajectory_ids)
    left, op, right = trajectory_ids[..., 0], trajectory_ids[..., 1], trajectory_ids[..., 2]
    result = trajectory_ids[..., 4]
    is_digit = lambda t: (t >= DIGIT0) & (t < DIGIT0 + 10)  # noqa: E731
    valid = (is_digit(left) & is_digit(right) & is_digit(result) & (op >= OP0) & (op < OP0 + 3)
             & (trajectory_ids[..., 3] == EQUALS) & (trajectory_ids[..., 5] == STEP_END))
    if not bool(valid.all()):
        raise ValueError("trajectory_ids has steps that are not 'digit op digit = digit ;'")
    return left - DIGIT0, op - OP0, right - DIGIT0, result - DIGIT0


def corrupt(trajectory_ids: Tensor, *, generator: torch.Generator,
            step: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Makes one step of each trajectory wrong and propagates the error to the end.

    ``trajectory_ids [..., S, 6]``: step ``s`` (``step``: an int, a LongTensor broadcastable to
    the leading shape, or None to draw one per trajectory) keeps its operands but gets the result
    ``(c + δ) mod 10``, δ drawn from 1..9; every later step then restates the wrong running value
    in place of the true one and computes correctly from it. As every step is a permutation of
    Z_10, each result from step s on differs from the true one, the final one included; the
    question's answer (``answer_ids``) is not touched, so it stays the TRUE answer.

    Returns ``(corrupted ids [..., S, 6], step [...])``. ValueError for an empty trajectory, a
    malformed step, a chain whose steps do not follow on from each other, or a multiplier that is
    not a unit (the error could heal).
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    left, op, right, result = parse_steps(trajectory_ids)
    lead, steps = tuple(trajectory_ids.shape[:-2]), trajectory_ids.shape[-2]
    if steps == 0:
        raise ValueError("trajectory_ids has no steps to corrupt")
    if step is None:
        step = torch.randint(0, steps, lead, generator=generator, dtype=torch.int64)
    else:
        if isinstance(step, bool) or not isinstance(step, (int, Tensor)):
            raise TypeError(f"step must be an int, a LongTensor or None, got {type(step).__name__}")
        step = torch.as_tensor(step, dtype=torch.int64)
        try:
            step = step.broadcast_to(lead).clone()
        except RuntimeError:
            raise ValueError(f"step has shape {list(step.shape)}, which does not broadcast to the "
                             f"trajectories' leading shape {list(lead)}") from None
        if bool(((step < 0) | (step >= steps)).any()):
            raise ValueError(f"step must be in [0, {steps}), got {step.unique().tolist()}")
    step = step.to(trajectory_ids.device)
    delta = 1 + torch.randint(0, 9, lead, generator=generator, dtype=torch.int64).to(step.device)

    new_left, new_right, new_result = left.clone(), right.clone(), result.clone()
    wrong = None
    for t in range(steps):
        at, after = step == t, step < t
        true_prev = result[..., t - 1] if t else None
        if bool(after.any()):
            # The running value is the left operand of '-', and whichever operand of a
            # commutative '+' or '*' carries the previous true result.
            is_left = (op[..., t] == MINUS) | (left[..., t] == true_prev)
            is_right = (op[..., t] != MINUS) & (right[..., t] == true_prev)
            if bool((after & ~is_left & ~is_right).any()):
                raise ValueError("trajectory_ids has a step whose operands do not restate the "
                                 "previous step's result; it is not a chain")
            other = torch.where(is_left, right[..., t], left[..., t])
            if bool((after & (op[..., t] == TIMES) & (other.remainder(2) == 0)
                     | after & (op[..., t] == TIMES) & (other == 5)).any()):
                raise ValueError("trajectory_ids multiplies by a digit that is not a unit of "
                                 "Z_10 (1, 3, 7, 9), so a propagated error could vanish")
            a = torch.where(is_left, wrong, left[..., t])
            b = torch.where(is_left, right[..., t], wrong)
            new_left[..., t] = torch.where(after, a, left[..., t])
            new_right[..., t] = torch.where(after, b, right[..., t])
            new_result[..., t] = torch.where(after, apply_op(a, op[..., t], b), result[..., t])
        new_result[..., t] = torch.where(at, (result[..., t] + delta).remainder(10),
                                         new_result[..., t])
        wrong = new_result[..., t]
    return _step_tokens(new_left, op, new_right, new_result).to(trajectory_ids.dtype), step


def _check_trajectory(trajectory_ids) -> None:
    if not isinstance(trajectory_ids, Tensor):
        raise TypeError(f"trajectory_ids must be a torch.Tensor, got "
                        f"{type(trajectory_ids).__name__}")
    if trajectory_ids.dim() < 2 or trajectory_ids.shape[-1] != STEP_TOKENS:
        raise ValueError(f"trajectory_ids has shape {list(trajectory_ids.shape)}, expected "
                         f"[..., S, {STEP_TOKENS}] (one row of {STEP_TOKENS} tokens per step)")
    if trajectory_ids.dtype.is_floating_point or trajectory_ids.dtype == torch.bool:
        raise TypeError(f"trajectory_ids must hold integer token ids, got {trajectory_ids.dtype}")
