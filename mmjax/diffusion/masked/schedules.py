"""How many tokens each denoising step commits: exact integer counts, computed on the host.

A block of ``N`` [MASK] positions is decoded in ``steps`` steps; step ``k`` commits
``counts[k]`` tokens (``sum(counts) == N``, each at least 1). The counts are static numpy
arrays, so the compiled loop reads them from a table.

* `transfer_schedule`: a full block (plain generation);
* `infill_steps_for` / `infill_schedule`: an infill block holding only ``m`` [M] positions
  (LaViDa-FIM inference). With ``rule='jump'`` (the spec: the reverse process starts at
  ``t = m / block_length`` instead of 1, keeping the step density of a full block) it gets
  ``ceil(steps m / block_length)`` steps, with 'full' (LaViDa's released code)
  ``min(steps, m)``; `infill_table` holds every ``m`` of a block as one array.
"""
from __future__ import annotations

import functools

import numpy as np

SCHEDULES = ("linear", "cosine", "shift")
INFILL_STEPS = ("jump", "full")


def transfer_schedule(num_tokens: int, steps: int, schedule: str = "linear",
                      shift_a: float = 1 / 3) -> np.ndarray:
  """Tokens committed at each of ``steps`` steps of one block of ``num_tokens`` masks.

  * 'linear' (LLaDA): ``num_tokens // steps`` each, the remainder to the first steps.
  * 'cosine' / 'shift': time runs from t = 1 (all masked) to 0 on the grid
    ``t_k = 1 - k / steps``; the masked fraction at ``t`` is ``s(t)``, so the committed count
    after step k is ``floor(N (1 - s(t_k)))`` and a step commits the difference, at least 1
    (the extra ones are taken from the largest counts). 'cosine': ``s(t) = (1 - cos(pi t)) / 2``
    (LaViDa's code; symmetric, slow-fast-slow). 'shift' (LaViDa): ``s(t) = a t / (1 + (a - 1)
    t)``; ``a = 1/3`` front-loads unmasking; counts are returned largest first. (The spec's
    K=8 example ``[9, 7, 4, 4, 2, 2, 2, 1]`` sums to 31; this rule, which reproduces its K=16
    example, ends in 2.)

  >>> transfer_schedule(32, 16, "shift").tolist()
  [5, 4, 4, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
  >>> transfer_schedule(32, 8, "shift").tolist()
  [9, 7, 4, 4, 2, 2, 2, 2]
  >>> transfer_schedule(10, 4).tolist()
  [3, 3, 2, 2]
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
  if not 1 <= steps <= num_tokens:
    raise ValueError(f"steps per block ({steps}) must be in [1, block_length={num_tokens}]")
  if schedule == "linear":
    base, rem = divmod(num_tokens, steps)
    return base + (np.arange(steps) < rem).astype(np.int64)
  u = np.arange(steps + 1, dtype=np.float64) / steps           # 1 - t_k
  if schedule == "cosine":
    done = (1.0 - np.cos(np.pi * u)) / 2.0
  else:
    if shift_a <= 0:
      raise ValueError(f"shift_a must be positive, got {shift_a}")
    done = u / (shift_a + (1.0 - shift_a) * u)                 # = 1 - s(1 - u)
  cum = np.floor(done * num_tokens + 1e-9).astype(np.int64)
  cum[0], cum[-1] = 0, num_tokens
  counts = np.maximum(np.diff(cum), 1)
  while counts.sum() > num_tokens:                              # pay for the forced 1s
    counts[np.argmax(counts)] -= 1
  return np.sort(counts)[::-1].copy() if schedule == "shift" else counts


def infill_steps_for(num_masked: int, steps: int, block_length: int,
                     rule: str = "jump") -> int:
  """Steps an infill block with ``num_masked`` [M] of ``block_length`` positions gets when
  a full block gets ``steps``: 'jump' ``ceil(steps m / block_length)`` (the process starts at
  ``t = m / block_length``; same tokens per step as a full block), 'full' ``steps``; both
  capped to [1, m] (0 when m = 0).

  >>> [infill_steps_for(m, 8, 32) for m in (0, 1, 4, 5, 31, 32)]
  [0, 1, 1, 2, 8, 8]
  >>> [infill_steps_for(m, 8, 32, "full") for m in (0, 1, 4, 5, 31, 32)]
  [0, 1, 4, 5, 8, 8]
  """
  if rule not in INFILL_STEPS:
    raise ValueError(f"infill_steps={rule!r} is not one of {INFILL_STEPS}")
  if num_masked <= 0:
    return 0
  s = -(-steps * num_masked // block_length) if rule == "jump" else steps
  return int(min(num_masked, max(1, s)))


def infill_schedule(num_masked: int, steps: int, block_length: int, schedule: str = "linear",
                    shift_a: float = 1 / 3, rule: str = "jump") -> np.ndarray:
  """Tokens committed per step in an infill block with ``num_masked`` [M] positions:
  ``transfer_schedule(m, infill_steps_for(m, ...))`` (empty when m = 0). With m =
  block_length it is the plain block schedule.

  >>> infill_schedule(5, 8, 32).tolist(), infill_schedule(5, 8, 32, rule="full").tolist()
  ([3, 2], [1, 1, 1, 1, 1])
  >>> infill_schedule(12, 8, 32, "shift").tolist()
  [7, 3, 2]
  """
  n = infill_steps_for(num_masked, steps, block_length, rule)
  if n == 0:
    return np.zeros((0,), np.int64)
  return transfer_schedule(num_masked, n, schedule, shift_a)


@functools.lru_cache(maxsize=32)
def infill_table(block_length: int, steps: int, schedule: str, shift_a: float,
                 rule: str) -> np.ndarray:
  """``[block_length + 1, steps]``: row m is `infill_schedule` (m [M] in a block), 0-padded.

  >>> infill_table(4, 2, "linear", 1 / 3, "jump").tolist()
  [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2]]
  """
  table = np.zeros((block_length + 1, steps), np.int32)
  for m in range(1, block_length + 1):
    counts = infill_schedule(m, steps, block_length, schedule, shift_a, rule)
    table[m, :len(counts)] = counts
  return table
