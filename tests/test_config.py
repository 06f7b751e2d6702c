"""The ``atomicity`` key: precedence, config files, per-backend tables, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import ckpt
from ckpt.config import load_config
from ckpt.registry import resolve


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CKPT_ATOMICITY", raising=False)
    monkeypatch.delenv("CKPT_CONFIG", raising=False)
    return tmp_path


def test_default_is_the_backends_auto(tmp_path: Path) -> None:
    r = resolve(tmp_path)
    assert r.name == "rename" and "auto" in r.source


def test_ckpt_toml_global_and_per_backend(tmp_path: Path) -> None:
    (tmp_path / "ckpt.toml").write_text(
        'atomicity = "rename"\n[backends.file]\natomicity = "commit_file"\n'
    )
    r = resolve(tmp_path)
    assert r.name == "commit_file" and "[backends.file]" in r.source


def test_pyproject_tool_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname="x"\n[tool.ckpt]\natomicity = "commit_file"\n'
    )
    assert ckpt.strategy_for(tmp_path).name == "commit_file"


def test_ckpt_toml_beats_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.ckpt]\natomicity = "commit_file"\n')
    (tmp_path / "ckpt.toml").write_text('atomicity = "rename"\n')
    assert ckpt.strategy_for(tmp_path).name == "rename"


def test_env_beats_file_and_argument_beats_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ckpt.toml").write_text('[backends.file]\natomicity = "rename"\n')
    monkeypatch.setenv("CKPT_ATOMICITY", "commit_file")
    assert ckpt.strategy_for(tmp_path).name == "commit_file"
    assert ckpt.strategy_for(tmp_path, "rename").name == "rename"
    assert resolve(tmp_path, "auto").name == "rename"


def test_ckpt_config_names_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text('atomicity = "commit_file"\n')
    monkeypatch.setenv("CKPT_CONFIG", str(other))
    assert ckpt.strategy_for(tmp_path).name == "commit_file"
    monkeypatch.setenv("CKPT_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError, match="CKPT_CONFIG"):
        load_config()


def test_unknown_strategy_lists_the_registered_ones(tmp_path: Path) -> None:
    (tmp_path / "ckpt.toml").write_text('atomicity = "atomik"\n')
    with pytest.raises(ckpt.UnknownStrategyError) as info:
        ckpt.strategy_for(tmp_path)
    assert "'atomik'" in str(info.value)
    assert "commit_file" in str(info.value) and "rename" in str(info.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.toml"]  # storage untouched


def test_malformed_config_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "ckpt.toml").write_text("atomicity = \n")
    with pytest.raises(ValueError, match=r"ckpt\.toml"):
        ckpt.strategy_for(tmp_path)
    (tmp_path / "ckpt.toml").write_text("atomicity = 3\n")
    with pytest.raises(ValueError, match="atomicity"):
        ckpt.strategy_for(tmp_path)
    (tmp_path / "ckpt.toml").write_text("backends = 3\n")
    with pytest.raises(ValueError, match="backends"):
        ckpt.strategy_for(tmp_path)


def test_backend_options_exclude_atomicity(tmp_path: Path) -> None:
    (tmp_path / "ckpt.toml").write_text('[backends.s3]\natomicity = "commit_file"\nregion = "eu"\n')
    assert load_config().backend_options("s3") == {"region": "eu"}


def test_tables_of_all_names_of_a_backend_apply() -> None:
    """A backend serving several schemes (gs and gcs) reads both tables; the URL's wins."""
    from ckpt.config import Config

    cfg = Config(
        backends={"gcs": {"atomicity": "rename", "project": "p", "x": 1}, "gs": {"x": 2}},
        source="ckpt.toml",
    )
    assert cfg.atomicity("gs") == (None, "")
    assert cfg.atomicity("gs", "gcs") == ("rename", "ckpt.toml [backends.gcs]")
    assert cfg.backend_options("gs", "gcs") == {"project": "p", "x": 2}
    assert cfg.backend_options("gcs", "gs") == {"project": "p", "x": 1}
