"""Named presets of ``ets eval``: a versioned TOML file of settings to run, not flags to retype.

Owns ``Preset`` (the dataset, methods, widths, seed, concurrency, the search config fields, per-width
``lambda_s`` and the throughput phase) and ``load_preset`` (by name from ``presets/`` beside this
module, or by path), which checks every field against ``SearchConfig`` so a bad preset fails by
naming its field. ``math500-reference`` is the ETS paper's MATH-500 configuration. Pure but for
reading the file.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ets.search.config import SearchConfig, preset_lambda_s
from ets.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "presets"


@dataclass(frozen=True)
class Throughput:
    methods: tuple[str, ...] = ("ets", "rebase")
    widths: tuple[int, ...] = ()
    concurrency: int = 8
    searches: int = 32
    rounds: int = 2


@dataclass(frozen=True)
class Preset:
    name: str
    version: int
    path: Path
    dataset: str
    methods: tuple[str, ...]
    widths: tuple[int, ...]
    config: dict[str, Any]
    lambda_s: dict[int, float] = field(default_factory=dict)
    seed: int = 0
    concurrency: int = 2
    description: str = ""
    throughput: Throughput | None = None

    def lambda_s_overrides(self, width: int) -> tuple[tuple[str, Any], ...]:
        """The ETS run's override at ``width``: none when the preset's lambda_s is the config's own
        width preset (so the run is plain ``ets``), else ``(("lambda_s", value),)``."""
        value = self.lambda_s.get(width)
        if value is None or value == preset_lambda_s(width):
            return ()
        return (("lambda_s", value),)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        out["lambda_s"] = {str(k): v for k, v in self.lambda_s.items()}
        return out


def available() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _ints(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(name, f"must be a non-empty list of positive integers, got {value!r}")
    return tuple(value)


def _strs(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(name, f"must be a non-empty list of names, got {value!r}")
    return tuple(value)


def load_preset(name_or_path: str) -> Preset:
    """The preset named ``name_or_path`` (a file in ``presets/``) or at that path; ``ConfigError``
    naming the field (``preset.<field>``) when something in it is wrong."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError("preset", f"no preset {name_or_path!r}; available: {', '.join(available())}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("preset", f"{path}: not TOML: {err}") from None
    known = {"name", "version", "description", "dataset", "methods", "widths", "seed", "concurrency", "config",
             "lambda_s", "throughput"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"preset.{unknown[0]}", f"unknown field in {path}")
    for key in ("name", "version", "dataset", "methods", "widths", "config"):
        if key not in raw:
            raise ConfigError(f"preset.{key}", f"missing in {path}")
    config = dict(raw["config"])
    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    per_run = {"method", "width", "seed"}  # set by the run, not the preset's config
    bad = sorted(set(config) - fields) or sorted(set(config) & per_run)
    if bad:
        raise ConfigError(f"preset.config.{bad[0]}", "not a search config field the preset may set")
    try:
        SearchConfig(**config).validate()
    except ConfigError as err:
        raise ConfigError(f"preset.config.{err.field}", err.message) from None
    lambda_s: dict[int, float] = {}
    for k, v in raw.get("lambda_s", {}).items():
        if not str(k).isdigit() or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError("preset.lambda_s", f"width {k!r}: expected a width and a number >= 0, got {v!r}")
        lambda_s[int(k)] = float(v)
    throughput = None
    if "throughput" in raw:
        t = dict(raw["throughput"])
        unknown = sorted(set(t) - {f.name for f in dataclasses.fields(Throughput)})
        if unknown:
            raise ConfigError(f"preset.throughput.{unknown[0]}", "unknown field")
        throughput = Throughput(
            methods=_strs("preset.throughput.methods", t.get("methods", ["ets", "rebase"])),
            widths=_ints("preset.throughput.widths", t.get("widths", raw["widths"])),
            concurrency=_ints("preset.throughput.concurrency", [t.get("concurrency", 8)])[0],
            searches=_ints("preset.throughput.searches", [t.get("searches", 32)])[0],
            rounds=_ints("preset.throughput.rounds", [t.get("rounds", 2)])[0])
    if not isinstance(raw["version"], int):
        raise ConfigError("preset.version", f"must be an integer, got {raw['version']!r}")
    return Preset(
        name=str(raw["name"]), version=raw["version"], path=path, dataset=str(raw["dataset"]),
        methods=_strs("preset.methods", raw["methods"]), widths=_ints("preset.widths", raw["widths"]),
        config=config, lambda_s=lambda_s, seed=int(raw.get("seed", 0)),
        concurrency=_ints("preset.concurrency", [raw.get("concurrency", 2)])[0],
        description=str(raw.get("description", "")), throughput=throughput)
