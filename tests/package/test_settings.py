"""The one settings loader (ets.settings): env parsing by annotation, flags, checks, errors naming
the env var or flag; and the search service's settings declared with it."""
from __future__ import annotations

import argparse
from pathlib import Path
from dataclasses import dataclass

import pytest

from ets import settings
from ets.errors import FieldError
from ets.service.admission import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED
from ets.service.settings import ServiceSettings, settings_from_args
from ets.settings import setting


class DemoError(FieldError):
    pass


@dataclass(frozen=True)
class Demo:
    name: str = setting("", env="{prefix}NAME", help="a name")
    port: int = setting(30000, env="{prefix}PORT", ge=1, le=65535)
    ratio: float | None = setting(None, env="{prefix}RATIO", gt=0, lt=1)
    on: bool = setting(False, env="{prefix}ON")
    device: str = setting("cuda", env="ETS_DEVICE", choices=("cuda", "cpu"), lower=True)
    gpus: tuple[int, ...] | None = setting(None, env=("{prefix}GPUS", "ETS_GPUS"))
    extra: tuple[str, ...] = setting(default_factory=tuple, env="{prefix}EXTRA", flag="")
    tag: str = setting(" ки", env="{prefix}TAG", strip=False, flag="")
    plain: int = 7  # not a setting: never read from the environment


def test_env_values_parse_by_annotation() -> None:
    env = {"X_NAME": " n ", "X_PORT": "31000", "X_RATIO": "0.5", "X_ON": "yes", "ETS_DEVICE": "CPU",
           "ETS_GPUS": "1,2", "X_EXTRA": "--a 1  --b", "X_PLAIN": "9", "X_OTHER": "z"}
    d = settings.from_env(Demo, env, prefix="X_", error=DemoError)
    assert d == Demo(name="n", port=31000, ratio=0.5, on=True, device="cpu", gpus=(1, 2),
                     extra=("--a", "1", "--b"), plain=7)
    # strip=False keeps whitespace that is part of the value (a token, a template).
    assert settings.from_env(Demo, {"X_TAG": " x\n"}, prefix="X_").tag == " x\n"
    # First name set wins: the per-prefix list over the shared one; empty values are unset.
    d = settings.from_env(Demo, {**env, "X_GPUS": "3", "X_PORT": "  "}, prefix="X_")
    assert d.gpus == (3,) and d.port == 30000
    # The same class read under another prefix.
    assert settings.from_env(Demo, {"Y_PORT": "2"}, prefix="Y_").port == 2
    assert settings.from_env(Demo, {}, base=Demo(port=5)).port == 5


@pytest.mark.parametrize(("env", "name", "reason"), [
    ({"X_PORT": "http"}, "X_PORT", "integer"),
    ({"X_PORT": "0"}, "X_PORT", "[1, 65535]"),
    ({"X_RATIO": "1"}, "X_RATIO", "(0, 1)"),
    ({"X_RATIO": "nan"}, "X_RATIO", "finite"),
    ({"X_ON": "maybe"}, "X_ON", "boolean"),
    ({"ETS_DEVICE": "tpu"}, "ETS_DEVICE", "one of"),
    ({"ETS_GPUS": "0,a"}, "ETS_GPUS", "comma-separated"),
])
def test_bad_env_values_name_the_variable(env: dict[str, str], name: str, reason: str) -> None:
    with pytest.raises(DemoError) as err:
        settings.from_env(Demo, env, prefix="X_", error=DemoError)
    assert err.value.field == name and reason in err.value.message
    assert str(err.value).startswith(name)


def test_flags_generated_from_fields_override_env() -> None:
    p = argparse.ArgumentParser()
    settings.add_flags(p, Demo, prefix="X_")
    flags = {a.option_strings[0] for a in p._actions if a.option_strings}
    assert flags == {"-h", "--name", "--port", "--ratio", "--on", "--device", "--gpus"}  # no --extra, --plain
    assert "X_PORT" in p.format_help() and "one of cuda|cpu" in p.format_help()
    args = p.parse_args(["--port", "31001", "--no-on", "--gpus", "4"])
    d = settings.from_args(Demo, args, env={"X_PORT": "1", "X_ON": "1", "X_NAME": "env"}, prefix="X_")
    assert (d.port, d.on, d.gpus, d.name) == (31001, False, (4,), "env")
    with pytest.raises(DemoError) as err:
        settings.from_args(Demo, p.parse_args(["--port", "99999"]), env={}, prefix="X_", error=DemoError)
    assert err.value.field == "--port (X_PORT)" and "65535" in err.value.message


def test_check_names_field_or_env() -> None:
    settings.check(Demo(device="CPU"))  # case-insensitive choice
    with pytest.raises(DemoError) as err:
        settings.check(Demo(port=0), error=DemoError)
    assert err.value.field == "port"
    with pytest.raises(DemoError) as err:
        settings.check(Demo(ratio=2.0), error=DemoError, naming="env", prefix="X_")
    assert err.value.field == "X_RATIO"


def test_table_lists_every_setting() -> None:
    rows = settings.table(Demo, prefix="X_").splitlines()
    assert len(rows) == 2 + 8
    assert "| `X_GPUS` / `ETS_GPUS` | `--gpus` | - |" in rows[7]


def test_unsupported_annotation_is_a_programming_error() -> None:
    @dataclass
    class Bad:
        x: dict[str, int] = setting(default_factory=dict, env="X")

    with pytest.raises(TypeError):
        settings.from_env(Bad, {"X": "1"})


def test_service_settings_env_and_flags() -> None:
    s = settings_from_args([], env={})
    assert s == ServiceSettings()
    assert (s.max_concurrent, s.max_queued, s.metrics_port) == (DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED, 9091)
    env = {"ETS_SEARCH_PORT": "6000", "ETS_SEARCH_METRICS_PORT": "-1", "ETS_MAX_CONCURRENT_SEARCHES": "2",
           "ETS_MAX_QUEUED_SEARCHES": "0", "ETS_SEARCH_GRACE_S": "5", "ETS_POLICY_ENGINE_URL": "http://e:1"}
    s = settings_from_args(["--max-concurrent", "3", "--grace", "7"], env=env)
    assert (s.port, s.metrics_port, s.max_concurrent, s.max_queued, s.grace_s, s.policy_engine_url) == (
        6000, None, 3, 0, 7.0, "http://e:1")


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["--max-concurrent", "0"], {}, "ETS_MAX_CONCURRENT_SEARCHES"),
    ([], {"ETS_MAX_QUEUED_SEARCHES": "-1"}, "ETS_MAX_QUEUED_SEARCHES"),
    ([], {"ETS_SEARCH_PORT": "x"}, "ETS_SEARCH_PORT"),
    (["--metrics-port", "70000"], {}, "ETS_SEARCH_METRICS_PORT"),
])
def test_service_settings_errors_exit_2_naming_the_setting(argv: list[str], env: dict[str, str], named: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        settings_from_args(argv, env=env)
    assert err.value.code == 2
    assert named in capsys.readouterr().err


def test_reward_server_settings_env_flags_and_checks() -> None:
    from ets.reward.main import config_from_args
    from ets.errors import SettingError
    from ets.reward.settings import RewardServerConfig

    env = {"ETS_PRM_MODEL": "/prm", "ETS_DEVICE": "CPU", "ETS_REWARD_PORT": "0", "ETS_PRM_STEP_TAG": "<s>",
           "ETS_REWARD_GRACE_S": "3"}
    cfg, ready = config_from_args(["--port", "7", "--prm-backend", "transformers", "--ready-file", "/r"], env)
    assert (cfg.prm_model, cfg.device, cfg.port, cfg.prm_backend, cfg.grace_s, ready) == (
        "/prm", "cpu", 7, "transformers", 3.0, "/r")
    assert cfg.options.step_tag == "<s>" and cfg.validate() is cfg
    assert RewardServerConfig.from_env(env) == RewardServerConfig(
        prm_model="/prm", device="cpu", port=0, grace_s=3.0, options=cfg.options, prm_engine=cfg.prm_engine)
    assert cfg.prm_engine.device == "cpu"  # the PRM engine's settings are read with the rest
    with pytest.raises(SettingError) as err:
        config_from_args(["--max-batch-size", "0"], env)
    assert err.value.field == "--max-batch-size (ETS_REWARD_MAX_BATCH_SIZE)"
    # Built in code: the declared bounds still apply, named by the env var.
    with pytest.raises(SettingError) as err:
        RewardServerConfig(prm_model="/prm", metrics_port=70000).validate()
    assert err.value.field == "ETS_REWARD_METRICS_PORT"


def test_settings_page_is_the_generated_reference() -> None:
    from ets.settings_reference import DOC, generated_section, reference

    page = (Path(__file__).resolve().parents[2] / DOC).read_text()
    assert generated_section(page) == reference(), f"{DOC} is stale: ets settings --write {DOC}"


def test_settings_command_rewrites_the_generated_section(tmp_path: Path) -> None:
    from ets.settings_reference import BEGIN, END, main, reference

    page = tmp_path / "settings.md"
    page.write_text(f"# x\n\n{BEGIN}stale\n{END}\n\nmore\n")
    main(["--write", str(page)])
    assert page.read_text() == f"# x\n\n{BEGIN}{reference()}{END}\n\nmore\n"
    with pytest.raises(SystemExit):
        main(["--bogus"])
