"""RFS-simple (Tian, Wang, Krishnan, Tenenbaum & Isola, "Rethinking Few-Shot Image Classification: a Good
Embedding Is All You Need?", ECCV 2020).

Pretraining: cross-entropy of a linear classifier over the merged training classes (Sec. 3.2, eq. 2;
the paper merges train and val, metashot keeps val for selection). Test: the features of each task are
L2-normalised and an L2-regularised multinomial logistic regression is fitted on its support set
(Sec. 3.3, eq. 3; scikit-learn's defaults in the paper's code, C = 1). The distilled variant (RFS-distill,
eq. 4-5) is not implemented.
"""

from __future__ import annotations

from typing import ClassVar

from metashot.methods.baseline import Baseline


class RFS(Baseline):
    """:class:`~metashot.methods.baseline.Baseline` (linear classifier) tested with the logistic head."""

    default_head: ClassVar[dict[str, str]] = {"linear": "logistic", "cosine": "logistic"}
