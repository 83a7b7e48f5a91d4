"""Presets: one named recipe per paper table cell. ``metashot presets`` lists them."""

from __future__ import annotations

from metashot.config import Config


def _omniglot_protonet(ways: int, shots: int) -> Config:
    # Snell et al. 2017: 60-way training episodes with 5 queries per class, shot = test shot;
    # Adam 1e-3 halved every 2,000 episodes; 1,000 test episodes.
    return Config(
        method="protonet", ways=ways, shots=shots, queries=15,
        train_ways=60, train_shots=shots, train_queries=5,
        steps=20_000, lr=1e-3, lr_step=2_000, lr_gamma=0.5,
        val_every=500, val_episodes=200, test_episodes=1_000,
    )


def _omniglot_matching(ways: int, shots: int) -> Config:
    # Vinyals et al. 2016: Conv4, 28x28, 1,200 training characters with rotations (the random split;
    # 172 of them held out to pick the checkpoint, as ProtoNet: the paper names no validation set);
    # training tasks match the test ways and shots, as in the paper; cosine attention without FCE
    # (their Omniglot rows; FCE: --set method_args='{"fce": true}'). The paper gives neither optimiser
    # nor query count: Adam 1e-3 halved every 2,000 episodes as ProtoNet, and 75-100 training queries
    # per episode (15 per class at 5-way, 5 at 20-way, so 20-way fits a CPU); 1,000 test episodes.
    return Config(
        method="matching", method_args={"fce": False}, ways=ways, shots=shots, queries=15,
        train_queries=15 if ways <= 5 else 5,
        steps=20_000, lr=1e-3, lr_step=2_000, lr_gamma=0.5,
        val_every=500, val_episodes=200, test_episodes=1_000,
    )


PRESETS: dict[str, Config] = {
    f"protonet-omniglot-{w}w{k}s": _omniglot_protonet(w, k) for w in (5, 20) for k in (1, 5)
}
PRESETS.update(
    {f"matching-omniglot-{w}w{k}s": _omniglot_matching(w, k) for w in (5, 20) for k in (1, 5)}
)
DEFAULT_PRESET = {"protonet": "protonet-omniglot-5w1s", "matching": "matching-omniglot-5w1s"}


def get(name: str) -> Config:
    """The preset ``name``, with ``preset`` set to its name."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(preset=name)
