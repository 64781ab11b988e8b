"""Shared pytest configuration."""
import pytest
import torch


def pytest_configure(config):
    # also declared in pyproject.toml; registering here keeps `-m slow` / `-m "not slow"` free of warnings when the
    # tests run without it (e.g. from a source checkout with another rootdir)
    config.addinivalue_line("markers", "slow: long-running test (over a minute); deselect with -m 'not slow'")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: its tensors are tiny (or its SVDs many), and on a shared 2-core machine
    extra threads only add synchronisation stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
