"""Freeing statistics once used: Calibration.release and project_whitened(release_statistics=True) give the same
projection as keeping them, free shared statistics only with their last layer, and refuse what they cannot do."""
import copy

import pytest
import torch
from torch import nn

from torch_sttp.calibration import calibrate
from torch_sttp.data_aware import project_whitened
from torch_sttp.ranks import project

pytestmark = pytest.mark.usefixtures("one_thread")


class _SharedInput(nn.Module):
    """Two heads reading the same tensor (one shared statistic), then a third layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 10), nn.Linear(12, 10), nn.Linear(20, 6)

    def forward(self, x):
        return self.c(torch.tanh(torch.cat([self.a(x), self.b(x)], -1)))


def _setup(seed=0, means=False):
    torch.manual_seed(seed)
    model = _SharedInput().double()
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(24, 12, generator=g, dtype=torch.float64).cumsum(-1) for _ in range(3)]
    return model, batches, calibrate(model, batches, means=means)


def test_release_frees_a_shared_statistic_only_with_its_last_layer():
    _, _, stats = _setup()
    assert stats.shared("a") == ["a", "b"]
    full = stats.nbytes
    moment_b = stats.moment("b")
    stats.release(["a"])
    assert "a" not in stats and stats.nbytes == full and torch.equal(stats.moment("b"), moment_b)
    stats.release(["b"])
    assert stats.names == ["c"] and stats.nbytes == full - 12 * 13 // 2 * 8  # the packed 12 × 12 sum
    with pytest.raises(KeyError, match="'zz'"):
        stats.release(["c", "zz"])
    assert stats.names == ["c"]  # nothing changed by the refused call


@pytest.mark.parametrize("method,centered", [("svdp", False), ("sttp", False), ("svdp", True)])
def test_projection_that_releases_equals_the_one_that_keeps(method, centered):
    model, _, stats = _setup(means=centered)
    kept, released = copy.deepcopy(model), copy.deepcopy(model)
    ranks = {"a": 3, "b": 4, "c": 2} if method == "svdp" else {"a": 4, "b": 4, "c": 3}
    first = project_whitened(kept, method, ranks, stats, centered=centered)
    mine = copy.deepcopy(stats)
    second = project_whitened(released, method, ranks, mine, centered=centered, release_statistics=True)
    for name in ranks:
        assert torch.equal(getattr(kept, name).weight, getattr(released, name).weight)
        assert torch.equal(getattr(kept, name).bias, getattr(released, name).bias)
    assert second.errors == first.errors and second.bias_corrected == first.bias_corrected
    assert len(mine) == 0 and mine.nbytes == 0 and len(stats) == 3


def test_release_keeps_the_statistics_of_layers_not_projected_and_refuses_sequential():
    model, batches, stats = _setup()
    project_whitened(model, "svdp", {"c": 2}, stats, release_statistics=True)
    assert stats.names == ["a", "b"]
    other, _, _ = _setup()
    with pytest.raises(ValueError, match="release_statistics"):
        project_whitened(other, "svdp", 2, batches=batches, sequential=True, release_statistics=True)


def test_ranks_project_passes_release_on_and_refuses_it_without_statistics():
    model, batches, stats = _setup()
    reference = copy.deepcopy(model)
    project(reference, "svdp", {"a": 3, "c": 2}, calibration=copy.deepcopy(stats), progress=False)
    project(model, "svdp", {"a": 3, "c": 2}, calibration=stats, progress=False, release_statistics=True)
    assert stats.names == ["b"]  # a's shared statistic stays with b, which was not projected
    for name in ("a", "c"):
        assert torch.equal(getattr(model, name).weight, getattr(reference, name).weight)
    other, _, _ = _setup()
    with pytest.raises(ValueError, match="release_statistics"):
        project(other, "svdp", 2, progress=False, release_statistics=True)
