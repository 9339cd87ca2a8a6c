"""`_batches` / `local_batches` (client/local/local_training.py): each pass uses every sample
exactly once, with no batch of one (BatchNorm needs two), for every n mod batch size.

Before issue 26 `chunks[-2] = torch.cat([chunks[-2], chunks.pop()])` popped before the
target index was taken: 17 samples in batches of 8 dropped samples 0–7 and trained 8–15
twice; 9 samples raised IndexError (the site then fell out of training)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from client.local.local_training import _batches, local_batches
from shared.training_params import TrainParams


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_every_sample_once_per_pass_and_no_batch_of_one(size: int) -> None:
    for n in range(1, 3 * size + 2):  # every n mod size, over several full batches
        order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        chunks = _batches(order, size)
        used = torch.cat(chunks).tolist()
        assert sorted(used) == list(range(n)), (n, size, [c.tolist() for c in chunks])
        if n >= 2:
            assert min(len(c) for c in chunks) >= 2, (n, size, [len(c) for c in chunks])
        assert max(len(c) for c in chunks) <= size + 1


def test_17_samples_in_batches_of_8() -> None:
    chunks = _batches(torch.arange(17), 8)
    assert [c.tolist() for c in chunks] == [list(range(8)), list(range(8, 17))]


def test_9_samples_in_batches_of_8_is_one_batch() -> None:
    assert [c.tolist() for c in _batches(torch.arange(9), 8)] == [list(range(9))]


@pytest.mark.parametrize("n", range(2, 20))
def test_local_batches_epochs_use_each_sample_once_per_pass(n: int) -> None:
    p = replace(TrainParams.from_query({"model": "dl_us"}), batch_size=4, epochs=2,
                local_steps=0)
    samples = np.arange(100, 100 + n)
    batches = local_batches(samples, p, torch.Generator().manual_seed(0))
    used = np.concatenate(batches)
    assert np.array_equal(np.sort(used), np.sort(np.concatenate([samples, samples])))
    assert min(len(b) for b in batches) >= 2
