"""Where every random number of a private run comes from: the one place that draws seeds.

Five streams feed a run: ``"sampling"`` (Poisson masks, shuffles), ``"noise"`` (the Gaussian noise of each
released gradient), ``"histogram"`` (noise of released diagnostics), ``"probe"`` (which items the sample-mixing
probe draws, and when) and ``"audit"`` (the canaries of a privacy audit, :mod:`lightning_dp.audit`). Their roots
come from the operating
system's entropy pool, fresh for every ``fit`` and never from torch's or Python's global RNG, so
``seed_everything`` cannot rewind them and a resumed run cannot draw the noise or the batches of earlier steps
again. The roots are never written to checkpoints: a published checkpoint holds nothing from which batches or
noise could be rebuilt.

Each step's generator is derived from ``(root, purpose, branch, rank, step)``, so a run given explicit seeds (for
reproducible tests) continues after a resume exactly as an uninterrupted run would, and a deliberate fork of the
run (a resume from a checkpoint older than steps already taken) draws on a new ``branch``.

``secure=True`` replaces torch's Mersenne-Twister/Philox generators by a cryptographically secure generator
(SHAKE-256 keyed by 256 bits of OS entropy per fit): the guarantee then does not rest on a PRNG whose state could
be reconstructed from its outputs.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Protocol

import torch
from torch import Tensor

from lightning_dp.console import warn
from lightning_dp.errors import DPMisconfigurationError

#: The purposes a run draws random numbers for.
PURPOSES = ("sampling", "noise", "histogram", "probe", "audit")


def fresh_seed(bits: int = 63) -> int:
    """A seed of ``bits`` bits from the operating system's entropy pool (not from any global RNG a user can seed)."""
    return secrets.randbits(bits)


def derive_seed(root: int, *keys: object) -> int:
    """A 63-bit seed derived from ``root`` and ``keys`` by a cryptographic hash (distinct keys give independent
    streams; torch's ``manual_seed`` of nearby integers would not be a concern, but hashing also hides ``root``).
    """
    digest = hashlib.blake2b(repr((int(root), *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def stream_source(root: int, purpose: str, step: int, rank: int = 0, branch: int = 0, index: int = 0) -> TorchSource:
    """The ``index``-th torch-generator source of ``purpose`` for one step, rank and branch of a run whose root
    seed is ``root``.
    """
    return TorchSource(derive_seed(root, purpose, int(branch), int(rank), int(step), int(index)))


class RandomSource(Protocol):
    """Draws the random numbers of one step for one purpose."""

    def normal(self, shape: tuple[int, ...], std: float, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Independent N(0, std²) entries of the given shape."""
        ...

    def uniform(self, n: int) -> Tensor:
        """``n`` independent U[0, 1) numbers (float64, on the CPU)."""
        ...

    def permutation(self, n: int) -> Tensor:
        """A uniformly random permutation of ``range(n)`` (int64, on the CPU)."""
        ...


class TorchSource:
    """A :class:`RandomSource` on a torch generator seeded with ``seed``.

    Args:
        seed: the generator's seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(derive_seed(self.seed, str(device.type)))
            self._generators[device] = gen
        return gen

    def normal(self, shape: tuple[int, ...], std: float, device: torch.device, dtype: torch.dtype) -> Tensor:
        """See :class:`RandomSource`."""
        gen = self._generator(device)
        return torch.normal(0.0, float(std), size=tuple(shape), device=device, dtype=dtype, generator=gen)

    def uniform(self, n: int) -> Tensor:
        """See :class:`RandomSource`."""
        return torch.rand(n, generator=self._generator(torch.device("cpu")), dtype=torch.float64)

    def permutation(self, n: int) -> Tensor:
        """See :class:`RandomSource`."""
        return torch.randperm(n, generator=self._generator(torch.device("cpu")))


class SecureSource:
    """A :class:`RandomSource` on a cryptographically secure generator: SHAKE-256 keyed by a 256-bit secret.

    torch has no CSPRNG (Opacus used torchcsprng, which is no longer maintained). The key is derived from a root of
    256 bits of OS entropy drawn fresh for every fit (never stored), so a stream is as unpredictable as the OS's
    generator, yet two ranks holding the same (broadcast) root draw the same shuffle. Uniforms take 53 bits each;
    Gaussians come from the Box–Muller transform in float64, then are cast. It is slow — 8 bytes of keystream per
    noise coordinate — which is why it is opt-in (``DPStrategy(secure_mode=True)``); the docs give the measured cost.

    Args:
        key: the stream's secret key (32 bytes).
    """

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)
        self._blocks = 0

    def _bytes(self, n: int) -> bytes:
        self._blocks += 1  # every draw from this source continues with fresh keystream
        return hashlib.shake_256(self._key + self._blocks.to_bytes(8, "little")).digest(n)

    def uniform(self, n: int) -> Tensor:
        """See :class:`RandomSource`."""
        if n <= 0:
            return torch.zeros(0, dtype=torch.float64)
        raw = torch.frombuffer(bytearray(self._bytes(8 * n)), dtype=torch.int64)
        # The top 53 bits of each word (>> 11 of a signed word is an arithmetic shift: mask to 53 bits).
        bits = (raw >> 11) & ((1 << 53) - 1)
        return bits.to(torch.float64) * 2.0**-53

    def normal(self, shape: tuple[int, ...], std: float, device: torch.device, dtype: torch.dtype) -> Tensor:
        """See :class:`RandomSource`."""
        n = math.prod(shape)
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        u1 = 1.0 - u[:pairs]  # in (0, 1]: the logarithm stays finite
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u[pairs:]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        return (z * float(std)).reshape(shape).to(device=device, dtype=dtype)

    def permutation(self, n: int) -> Tensor:
        """See :class:`RandomSource`."""
        return torch.argsort(self.uniform(n))


class RandomStreams:
    """The random streams of one private run: a root per purpose, fresh from OS entropy unless fixed by the user.

    Args:
        seeds: purpose → fixed root seed (for reproducible tests only; the guarantee then rests on the seed staying
            secret, and a warning says so). Purposes not given get a fresh root at every :meth:`refresh`.
        secure: draw every random number from the OS's cryptographically secure generator instead (seeds are then
            refused).

    Raises:
        DPMisconfigurationError: for an unknown purpose, a negative seed, or seeds together with ``secure``.

    Example:
        >>> streams = RandomStreams()
        >>> streams.refresh()
        >>> source = streams.source("noise", step=0)
    """

    def __init__(self, seeds: dict[str, int | None] | None = None, secure: bool = False) -> None:
        fixed = {k: v for k, v in (seeds or {}).items() if v is not None}
        unknown = set(fixed) - set(PURPOSES)
        if unknown:
            raise DPMisconfigurationError(f"Unknown random stream(s) {sorted(unknown)}; choose from {PURPOSES}.")
        for purpose, seed in fixed.items():
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise DPMisconfigurationError(f"{purpose}_seed must be a non-negative int, got {seed!r}.")
        if secure and fixed:
            raise DPMisconfigurationError(
                f"secure_mode=True draws from the OS's cryptographically secure generator and takes no seeds; got"
                f" {', '.join(f'{k}_seed' for k in fixed)}. Remove the seeds, or turn secure_mode off for reproducible"
                " tests."
            )
        self.fixed = fixed
        self.secure = secure
        self._roots: dict[str, int] = {}
        self._calls: dict[tuple[str, int, int], tuple[int | None, int]] = {}
        self._warned = False

    def refresh(self) -> None:
        """Draw fresh roots (from OS entropy) for every purpose without a fixed seed: call once per fit."""
        if self.fixed and not self._warned:
            self._warned = True
            warn(
                f"lightning_dp: {', '.join(f'{k}_seed' for k in sorted(self.fixed))} fixed: the privacy guarantee now"
                " rests on these seeds staying secret (anyone who knows them can rebuild the batches or cancel the"
                " noise). Use fixed seeds for reproducible tests only."
            )
        self._roots = {p: self.fixed.get(p, fresh_seed(256 if self.secure else 63)) for p in PURPOSES}
        self._calls = {}

    def root(self, purpose: str) -> int:
        """The current root of ``purpose`` (to broadcast under DDP; never store it)."""
        if purpose not in self._roots:
            self.refresh()
        return self._roots[purpose]

    def set_root(self, purpose: str, root: int) -> None:
        """Adopt ``root`` for ``purpose`` (e.g. the sampling root broadcast from rank 0 under DDP)."""
        if purpose not in self._roots:
            self.refresh()
        self._roots[purpose] = int(root)

    def source(self, purpose: str, step: int, rank: int = 0, branch: int = 0) -> RandomSource:
        """A random source of ``purpose`` for ``step`` on ``rank``, in the run's ``branch``.

        Every call returns an independent stream: two callers drawing for the same purpose and step (say two
        histogram callbacks) must never get the same noise, or the difference of their releases would cancel it.
        The n-th call for a (purpose, step, rank, branch) is keyed by n, so fixed seeds still reproduce a run.
        """
        key = (purpose, int(rank), int(branch))
        last_step, calls = self._calls.get(key, (None, 0))
        index = calls if last_step == step else 0
        self._calls[key] = (step, index + 1)
        if self.secure:
            material = repr((self.root(purpose), purpose, int(branch), int(rank), int(step), index)).encode()
            return SecureSource(hashlib.blake2b(material, digest_size=32).digest())
        return stream_source(self.root(purpose), purpose, step, rank, branch, index)


__all__ = [
    "PURPOSES",
    "RandomSource",
    "RandomStreams",
    "SecureSource",
    "TorchSource",
    "derive_seed",
    "fresh_seed",
    "stream_source",
]
