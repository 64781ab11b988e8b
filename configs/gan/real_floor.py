"""Real-vs-real Inception floor of the CPU GAN study (docs/results-gan.md).

The recipe's FID/KID reference set (``ImageSource.fixed(N)``, its cached features) against the next N images of the
same fixed permutation: disjoint, same class balance.

    PYTHONPATH=. python configs/gan/real_floor.py configs/gan/mnist5k-cpu-table1-sn.yaml runs/gan-cpu/cache 1000
"""
import sys

import torch

from torch_sttp.experiments.gan import ImageSource, reference_data_key, resolve_config
from torch_sttp.experiments.metrics import InceptionFeatures, cached_real_features, fid_from_features, kid_from_features

config, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(2)
cfg = resolve_config(config=config)
source = ImageSource(cfg, seed=0)
inception = InceptionFeatures(progress=False)
key = dict(reference_data_key(cfg), extractor=inception.name, n=n)
reference = cached_real_features(key, lambda: source.fixed(n), inception, cache)
features = inception(source.fixed(2 * n)[n:])
kid, _ = kid_from_features(reference, features)
print(f"real vs real, {n} vs {n}: FID {fid_from_features(reference, features):.2f}, KIDx100 {100 * kid:.3f}")
