"""Shared pytest configuration."""


def pytest_configure(config):
    # also declared in pyproject.toml; registering here keeps `-m slow` / `-m "not slow"` free of warnings when the
    # tests run without it (e.g. from a source checkout with another rootdir)
    config.addinivalue_line("markers", "slow: long-running test (over a minute); deselect with -m 'not slow'")
