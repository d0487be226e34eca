"""``ets settings``: every environment variable of the services, with its flag, default and meaning.

Generated from the settings dataclasses (``ets.settings``), so it cannot drift from the code;
README's settings reference is this command's output (a test keeps them equal).
"""
from __future__ import annotations

import sys

from ets import settings
from ets.config import SearchConfig
from ets.engine.launcher import LaunchConfig
from ets.reward.adapters import PrmOptions
from ets.reward.server import RewardServerConfig
from ets.service.settings import ServiceSettings


def reference() -> str:
    """The settings reference in Markdown: one table per component."""
    parts = [
        "#### `ets serve` (search service)",
        settings.table(ServiceSettings),
        "#### Search defaults (`ets serve`; a request's unset fields take these; meanings: "
        "`proto/ets/api/v1/search.proto`)",
        settings.table(SearchConfig, prefix="ETS_SEARCH_", every_field=True),
        "#### `ets reward-serve` (reward server)",
        settings.table(RewardServerConfig),
        "#### PRM token strings and judge templates (`ets reward-serve`; environment only)",
        settings.table(PrmOptions),
        "#### `ets policy-serve` (policy SGLang server; the reward server's PRM engine reads the same "
        "names with `ETS_PRM_SGLANG_` in place of `ETS_POLICY_`)",
        settings.table(LaunchConfig, prefix="ETS_POLICY_"),
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str]) -> None:
    if argv:
        print("usage: ets settings  (prints every setting as Markdown tables)", file=sys.stderr)
        raise SystemExit(2)
    sys.stdout.write(reference())


if __name__ == "__main__":
    main(sys.argv[1:])
