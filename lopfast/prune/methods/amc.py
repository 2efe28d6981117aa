"""AMC (He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices",
ECCV 2018) is deliberately not provided yet."""
from __future__ import annotations


def amc(engine, ratio, target, data, opts):
    """Not implemented: raises NotImplementedError.

    A faithful AMC needs a DDPG agent (actor/critic, truncated-normal exploration, replay
    buffer) walking the layers with the paper's 11-dimensional state embedding and the
    -error * log(FLOPs) reward under a resource budget, trained for hundreds of episodes.
    A random search under the name "amc" would be misleading; use method="eagleeye" for a
    search over layer-wise ratios.
    """
    raise NotImplementedError(
        "method='amc' (DDPG agent over layer-wise ratios, He et al. 2018) is not implemented in lopfast; "
        "a random search would not be AMC. Use method='eagleeye' for a layer-wise ratio search, or "
        "pass your own per-layer ratios via ignored/ratio."
    )
