"""``ets settings``: every environment variable of the services, with its flag, default and meaning.

Generated from the settings dataclasses (``ets.settings``), so it cannot drift from the code;
docs/settings.md is this command's output between two markers (a test keeps them equal):
``ets settings --write docs/settings.md`` rewrites that section after a setting is added or changed.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ets import settings
from ets.search.config import SearchConfig
from ets.engine.launcher import LaunchConfig
from ets.reward.adapters import PrmOptions
from ets.reward.settings import RewardServerConfig
from ets.service.settings import ServiceSettings


def reference() -> str:
    """The settings reference in Markdown: one table per component."""
    parts = [
        "## `ets serve` (search service)",
        settings.table(ServiceSettings),
        "## Search defaults (`ets serve`; a request's unset fields take these; meanings: "
        "`proto/ets/api/v1/search.proto`)",
        settings.table(SearchConfig, prefix="ETS_SEARCH_", every_field=True),
        "## `ets reward-serve` (reward server)",
        settings.table(RewardServerConfig),
        "## PRM token strings and judge templates (`ets reward-serve`; environment only)",
        settings.table(PrmOptions),
        "## `ets policy-serve` (policy SGLang server; the reward server's PRM engine reads the same "
        "names with `ETS_PRM_SGLANG_` in place of `ETS_POLICY_`)",
        settings.table(LaunchConfig, prefix="ETS_POLICY_"),
    ]
    return "\n\n".join(parts) + "\n"


BEGIN = "<!-- settings:begin (generated: ets settings) -->\n"
END = "<!-- settings:end -->"


DOC = Path("docs/settings.md")


def generated_section(text: str) -> str:
    """The generated part of a Markdown page (between the BEGIN and END markers)."""
    start = text.index(BEGIN) + len(BEGIN)
    return text[start:text.index(END, start)]


def main(argv: list[str]) -> None:
    if argv and (len(argv) != 2 or argv[0] != "--write"):
        print(f"usage: ets settings [--write {DOC}]  (Markdown tables of every setting; --write rewrites "
              "the page's generated section)", file=sys.stderr)
        raise SystemExit(2)
    if not argv:
        sys.stdout.write(reference())
        return
    path = Path(argv[1])
    text = path.read_text()
    old = generated_section(text)
    path.write_text(text.replace(BEGIN + old, BEGIN + reference(), 1))
    print(f"ets settings: {path} {'updated' if old != reference() else 'already current'}")


if __name__ == "__main__":
    main(sys.argv[1:])
