"""Poisson sampling statistics and batch splitting."""

import pytest
import torch
from scipy import stats

from lightning_dp.batch_selection import PoissonBatchSampler
from lightning_dp.microbatches import EmptyBatchCollate, split_batch


def test_poisson_batch_sizes_are_binomial():
    n, q, steps = 2000, 0.03, 3000
    sampler = PoissonBatchSampler(n, q, steps, seed=0)
    sizes = [len(b) for b in sampler]
    assert len(sizes) == steps
    # chi-square goodness of fit against Binomial(n, q) on pooled bins
    counts = torch.bincount(torch.tensor(sizes)).numpy()
    support = range(len(counts))
    expected = stats.binom.pmf(list(support), n, q) * steps
    lo, hi = int(n * q - 3 * (n * q) ** 0.5), int(n * q + 3 * (n * q) ** 0.5)
    obs = [counts[:lo].sum(), *counts[lo:hi], counts[hi:].sum()]
    exp = [expected[:lo].sum() + 0, *expected[lo:hi], steps - expected[:hi].sum()]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    assert stats.chi2.sf(chi2, len(obs) - 1) > 1e-3
    # each example is included with probability q
    freq = torch.zeros(n)
    for b in PoissonBatchSampler(n, q, steps, seed=1):
        freq[b] += 1
    assert abs(freq.mean().item() / steps - q) < 0.002


def test_distributed_poisson_union_is_independent_per_example():
    n, q, steps = 1001, 0.05, 2000
    ranks = [list(PoissonBatchSampler(n, q, steps, num_replicas=2, rank=r, seed=7)) for r in range(2)]
    sizes = []
    for a, b in zip(*ranks):
        assert not set(a) & set(b), "ranks draw disjoint shards"
        sizes.append(len(a) + len(b))
    sizes = torch.tensor(sizes, dtype=torch.float64)
    assert abs(sizes.mean().item() - n * q) < 0.5
    assert abs(sizes.var().item() / (n * q * (1 - q)) - 1) < 0.1
    # the two ranks' masks are not copies of each other
    assert sum(len(a) == len(b) for a, b in zip(*ranks)) < steps / 4


def test_epochs_differ_and_empty_batches_are_yielded():
    sampler = PoissonBatchSampler(50, 0.01, 100, seed=3)
    first = list(sampler)
    assert sum(len(b) == 0 for b in first) > 10
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_empty_collate_and_split():
    ds = [(torch.randn(3, 2), 1), (torch.randn(3, 2), 0)]
    collate = EmptyBatchCollate(torch.utils.data.default_collate, ds)
    x, y = collate([])
    assert x.shape == (0, 3, 2) and y.shape == (0,)
    batch = {"x": torch.arange(10), "meta": torch.tensor(5.0), "names": [str(i) for i in range(10)]}
    parts = split_batch(batch, 4)
    assert [s for _, s in parts] == [4, 4, 2]
    assert parts[2][0]["names"] == ["8", "9"] and parts[1][0]["x"].tolist() == [4, 5, 6, 7]
    assert split_batch((torch.zeros(0, 2), torch.zeros(0)), 4) == []


def test_the_old_sampling_module_still_imports_with_a_deprecation_warning():
    import lightning_dp.sampling as old

    with pytest.warns(DeprecationWarning, match="moved to lightning_dp.microbatches"):
        assert old.split_batch is split_batch
    with pytest.warns(DeprecationWarning, match="moved to lightning_dp.batch_selection"):
        assert old.PoissonBatchSampler is PoissonBatchSampler
