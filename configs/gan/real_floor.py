"""Real-vs-real Inception floor of the CPU GAN study (docs/results-gan.md).

The cached reference set (the first N images of the training split's seed-0 permutation, what the recipe's FID/KID
compare against) against the next N images of the same permutation: disjoint, same class balance.

    PYTHONPATH=. python configs/gan/real_floor.py runs/gan-cpu/cache 1000
"""
import glob
import sys

import numpy as np
import torch

from torch_sttp.experiments.data import load_mnist5k
from torch_sttp.experiments.metrics import InceptionFeatures, fid_from_features, kid_from_features

cache, n = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
reference = np.load(glob.glob(f"{cache}/real-features-inception-2015-12-05-pool3_mnist5k_{n}-*.npz")[0])["features"]
images, labels = load_mnist5k(image_size=32, split="train").tensors
order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
other = order[n:2 * n]
print("classes of the second set", torch.bincount(labels[other]).tolist(), flush=True)
features = InceptionFeatures(progress=False)(images[other])
kid, _ = kid_from_features(reference, features)
print(f"real vs real, {n} vs {n}: FID {fid_from_features(reference, features):.2f}, KIDx100 {100 * kid:.3f}")
