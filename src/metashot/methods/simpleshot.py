"""SimpleShot (Wang, Chao, Weinberger & van der Maaten, "SimpleShot: Revisiting Nearest-Neighbor
Classification for Few-Shot Learning", 2019).

Pretraining: cross-entropy of a linear classifier over the training classes (Sec. 3). Test: "CL2N"
features, x^ = (x - x_bar) / ||x - x_bar|| with x_bar the base classes' mean feature (Sec. 3, "feature
transformations"), then the nearest class centroid in Euclidean distance (eq. 1, multi-shot: the mean of
each class's support features).

metashot's x_bar is the running mean of the training features (momentum 0.01, over the last ~100
minibatches of the changing network, in training mode, on augmented images), not the paper's one pass
of the final network over the un-augmented base images: close once training has settled, and free.
"""

from __future__ import annotations

from typing import ClassVar

from metashot.methods.baseline import Baseline


class SimpleShot(Baseline):
    """:class:`~metashot.methods.baseline.Baseline` tested with :class:`~metashot.methods.heads.CL2N`,
    centred by the running mean of the training features (see the module's docstring)."""

    default_head: ClassVar[dict[str, str]] = {"linear": "cl2n", "cosine": "cl2n"}
