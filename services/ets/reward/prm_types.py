"""The reward server's vocabulary: the PRM type names it serves.

Owns ``PRM_TYPES`` (every type: how a PRM's input is formatted and its score read out,
``ets.reward.adapters``; or scored by rules, ``ets.reward.rules``) and ``MODEL_FREE_PRM_TYPES`` (the
rule-scored ones, served by the ``rules`` backend without a model). The one list: the reward
server, its adapters and backends, and the edges that check a search's ``prm_type``
(``ets.config.validate``) import it from here. Pure data; importing it loads nothing else.
"""
from __future__ import annotations

PRM_TYPES: tuple[str, ...] = ("math-shepherd", "rlhflow", "llemma", "qwen-prm", "judge", "arithmetic",
                               "grounded-arithmetic")
# Types scored by rules on the text, without a model (served by the reward server's ``rules`` backend).
MODEL_FREE_PRM_TYPES: tuple[str, ...] = ("arithmetic", "grounded-arithmetic")
