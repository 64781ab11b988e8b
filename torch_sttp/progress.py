"""Optional progress bars for the library's long loops (conversion, projection, calibration).

tqdm is an optional dependency (the ``experiments`` extra): every library function that can show a bar takes
``progress=False`` by default and asks for one here, so a core install never needs tqdm unless a bar is asked for,
and then the error says how to get it.
"""
from __future__ import annotations

from typing import Iterable

__all__ = ["progress_iter"]


def progress_iter(iterable: Iterable, enabled: bool, desc: str, unit: str) -> Iterable:
    """``iterable`` itself, or wrapped in a tqdm bar (on stderr) when ``enabled``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError(f"{desc}: progress=True needs tqdm (pip install tqdm, or torch-sttp[experiments]); "
                          "or pass progress=False") from err
    return tqdm(iterable, desc=desc, unit=unit)
