"""The tier markers (tests/support/tiers.py): assigned by explicit marker or SGLang fixture use, and a pure
test that leaves an SGLang engine running fails asking for the sglang marker."""
from __future__ import annotations

from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parents[1] / "support"

EXAMPLE = '''
import subprocess, sys, pytest

@pytest.fixture
def sglang_servers():
    return None

def test_plain():
    pass

def test_uses_engines(sglang_servers):
    pass

@pytest.fixture
def smollm2():
    return "weights"

def test_loads_weights(smollm2):
    pass

@pytest.mark.containers
def test_images():
    pass

def test_starts_an_engine_unmarked():
    # A stand-in whose command line reads like an SGLang engine's; killed after the check.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "sglang.launch_server"])
    pytest.proc = proc
'''


def test_tiers_assigned_and_checked(pytester: pytest.Pytester) -> None:
    pytester.syspathinsert(SUPPORT)
    pytester.makeconftest('pytest_plugins = ["tiers"]\n'
                          'def pytest_sessionfinish():\n'
                          '    import pytest\n'
                          '    if hasattr(pytest, "proc"): pytest.proc.kill(); pytest.proc.wait()\n')
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n"
                     "markers =\n    pure: p\n    models: m\n    sglang: s\n    containers: c\n")
    pytester.makepyfile(test_example=EXAMPLE)
    for tier, expected in (("pure", {"test_plain", "test_starts_an_engine_unmarked"}),
                           ("models", {"test_loads_weights"}), ("sglang", {"test_uses_engines"}),
                           ("containers", {"test_images"})):
        result = pytester.runpytest("-m", tier, "--collect-only", "-q")
        collected = {line.split("::")[1] for line in result.outlines if "::" in line}
        assert collected == expected, (tier, result.outlines)
    result = pytester.runpytest("-m", "pure")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*_ test_starts_an_engine_unmarked _*",
        "this test is in a tier without SGLang but started SGLang (pids *): mark it pytest.mark.sglang",
    ])
