"""Which parameters MAML's inner loop adapts (``MAML(inner_params=...)``): all but the normalisation
layers' (``"all"``, the default; ``adapt_norm=True`` adapts those too), ANIL's head, or those under given
name prefixes.

ANIL (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, section 4): ``inner_params="head"`` adapts only the last
``nn.Linear`` in the inner loop, theta_head' = theta_head - alpha grad_head L^support(theta_body,
theta_head); the body gets only the outer gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from metashot.methods.batchnorm import BatchNorm

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies under module ``prefix`` ("" is the root)."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


def head(model: nn.Module) -> str:
    """ANIL's head: the name of the model's last ``nn.Linear``."""
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError("inner_params='head' adapts the model's last nn.Linear, and it has none")
    return heads[-1]


def _norm_params(model: nn.Module) -> set[str]:
    """The names of the normalisation layers' own parameters (scales and shifts)."""
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, NORM_LAYERS):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False))
    return names


def split_params(
    model: nn.Module, adapt_norm: bool = False, inner_params: str | Sequence[str] = "all"
) -> tuple[list[str], list[str]]:
    """Names of the parameters the inner loop adapts, and of those it keeps.

    inner_params: "all" (every parameter but the normalisation layers', unless ``adapt_norm``), "head"
    (the last ``nn.Linear``'s: ANIL) or a list of name prefixes (the parameters under them).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if inner_params == "all":
        frozen = set() if adapt_norm else _norm_params(model)
        return [n for n in names if n not in frozen], [n for n in names if n in frozen]
    if inner_params == "head":
        prefixes = [head(model)]
    elif isinstance(inner_params, str):
        raise ValueError(f"inner_params must be 'all', 'head' or a list of prefixes, got {inner_params!r}")
    else:
        prefixes = list(inner_params)
    adapted = [n for n in names if any(under(n, p) for p in prefixes)]
    if not adapted:
        raise ValueError(f"inner_params {inner_params!r} selects none of the model's parameters")
    return adapted, [n for n in names if n not in adapted]


def adapts_batch_norm(model: nn.Module, adapted: Sequence[str]) -> bool:
    """Whether any of the ``adapted`` parameters is a batch-norm layer's scale or shift."""
    layers = [prefix for prefix, m in model.named_modules() if isinstance(m, BatchNorm)]
    return any(under(n, prefix) for prefix in layers for n in adapted)


__all__ = ["NORM_LAYERS", "adapts_batch_norm", "head", "split_params", "under"]
