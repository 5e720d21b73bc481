"""Orthogonal matrices for rotating a model's hidden states (QuaRot, SpinQuant).

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``;
``H / √n`` is orthogonal. Rotating a weight by it spreads every outlier column
over all columns (incoherence processing: Chee et al., QuIP, 2023; Ashkboos et
al., QuaRot, 2024), so a grid fits the rotated weights and activations better.

Orders built here: ``2ᵏ`` (Sylvester), and ``2ᵏ · m`` where ``m`` comes from a
Paley construction — ``m = q + 1`` for a prime ``q ≡ 3 (mod 4)`` (Paley I) or
``m = 2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (Paley II). That covers the
widths of the models we meet: 576 = 16 · 36 (SmolLM2), 1536 = 128 · 12,
2048, 4096, 14336 = 512 · 28. Pure tensor functions; ``quantmill.rotation``
decides what to rotate.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Built once, exactly, in float64 on the host; ``quantmill.rotation`` moves them.
F64 = torch.float64


def sylvester(n: int) -> Tensor:
    """The ±1 Hadamard matrix of order ``n`` (a power of two), as float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    H = torch.ones(1, 1, dtype=F64, device="cpu")
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> Tensor:
    """``Q[i, j] = χ(j − i)``, χ the quadratic character modulo the prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor(
        [0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=F64, device="cpu"
    )
    i = torch.arange(q, device="cpu")
    return chi[(i[None, :] - i[:, None]) % q]


def paley(m: int) -> Tensor | None:
    """A ±1 Hadamard matrix of order ``m`` from a Paley construction, or ``None``."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: I + [[0, 1ᵀ], [−1, Q]]
        S = torch.zeros(m, m, dtype=F64, device="cpu")
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=F64, device="cpu") + S
    q = m // 2 - 1
    if m % 2 == 0 and q % 4 == 1 and _is_prime(q):  # Paley II: C ⊗ blocks
        C = torch.zeros(q + 1, q + 1, dtype=F64, device="cpu")
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=F64, device="cpu")
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64, device="cpu")
        return torch.kron(C, one) + torch.kron((C == 0).double(), zero)
    return None


def hadamard(n: int) -> Tensor | None:
    """A ±1 Hadamard matrix of order ``n`` (float64), or ``None`` when none is built here."""
    power = n & -n  # the largest power of two dividing n
    while power >= 1:
        m = n // power
        core = sylvester(1) if m == 1 else paley(m)
        if core is not None:
            return torch.kron(sylvester(power), core)
        power //= 2
    return None


def random_hadamard(n: int, generator: torch.Generator) -> Tensor:
    """``diag(s) H / √n`` with random signs ``s``: orthogonal, float64. ``x @ Q`` flips
    signs at random, then mixes every channel into every other with equal weight."""
    H = hadamard(n)
    if H is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here")
    signs = torch.randint(0, 2, (n,), generator=generator, device="cpu").double() * 2 - 1
    return signs[:, None] * H / n**0.5


def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    A = torch.randn(n, n, generator=generator, dtype=F64, device="cpu")
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))[None, :]
