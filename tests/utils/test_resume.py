"""utils/resume.py: per-sample seeds for dataloader workers (the resume itself is tested end to end in
tests/test_crash_resume.py)."""
import random

import torch
from basicsr.data.data_sampler import EnlargedSampler

from tpdiff_plugin.utils.resume import python_random_seeded, sample_seed


class _Draws(torch.utils.data.Dataset):
    """Each item: its index and two draws from python's ``random`` (seeded per key when given one)."""
    SAMPLE_SEEDS = True

    def __len__(self):
        return 10

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            return torch.tensor([index, random.random(), random.random()], dtype=torch.float64)
        with python_random_seeded(seed):
            return self[index]


def _batches(num_workers, epoch=1):
    ds = _Draws()
    sampler = EnlargedSampler(ds, 1, 0, ratio=2)
    sampler._tpdiff_sample_seeds = 10  # what wrap_create_train_val_dataloader sets when workers load
    sampler.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler, num_workers=num_workers,
                                         drop_last=True, worker_init_fn=lambda wid: random.seed(wid))
    return torch.cat(list(loader))


def test_sample_seed_is_a_fixed_hash_of_run_epoch_and_position():
    assert sample_seed(10, 2, 5) == sample_seed(10, 2, 5)
    seeds = {sample_seed(s, e, p) for s in (0, 10) for e in range(3) for p in range(50)}
    assert len(seeds) == 300 and all(0 <= x < 2**64 for x in seeds)
    assert sample_seed(-1, 0, 0) == sample_seed(2**64 - 1, 0, 0)  # negative seeds are accepted


def test_python_random_seeded_restores_the_global_stream():
    random.seed(3)
    state = random.getstate()
    with python_random_seeded(42):
        inside = random.random()
    assert random.getstate() == state
    random.seed(42)
    assert random.random() == inside


def test_with_sample_seeds_the_batches_do_not_depend_on_the_workers():
    """Keyed draws: 1 and 2 workers (each seeded differently) load the same batches, in the epoch's order."""
    one, two = _batches(1), _batches(2)
    assert torch.equal(one, two)
    plain = EnlargedSampler(_Draws(), 1, 0, ratio=2)
    plain.set_epoch(1)
    assert one[:, 0].tolist() == [float(i) for i in plain][:len(one)]
    assert len({tuple(r[1:].tolist()) for r in one}) == len(one)  # every position draws anew (ratio 2 repeats)
    assert not torch.equal(one, _batches(1, epoch=2)[:len(one)])


def test_two_ranks_get_different_seeds_for_their_positions():
    seeds = []
    for rank in (0, 1):
        sampler = EnlargedSampler(_Draws(), 2, rank)
        sampler._tpdiff_sample_seeds = 10
        keys = list(iter(sampler))
        assert all(isinstance(k, tuple) for k in keys)
        seeds += [s for _, s in keys]
    assert len(set(seeds)) == 10
