"""Bad input: paths and URLs that are almost right, malformed or hostile checkpoint files,
symlinked steps, odd configuration. Each must give a clear ckpt error quickly (never a
hang, never a bare RecursionError or a third-party error), delete nothing and write
nothing outside the root.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from upath import UPath

import ckpt
from ckpt import tree_format
from ckpt.layout import METADATA_FILE
from ckpt.paths import to_path
from ckpt.step_metadata import MAX_METADATA_BYTES, StepMetadata

TREE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": 3}


def _files(root: Path) -> list[str]:
    """Every file and directory under ``root``, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def in_empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("CKPT_CONFIG", raising=False)
    monkeypatch.delenv("CKPT_ATOMICITY", raising=False)
    return cwd


# -- URLs that are almost right -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fixed"),
    [
        ("s3:/bucket/run", "s3://bucket/run"),
        ("gs:bucket/run", "gs://bucket/run"),
        ("S3:/bucket/run", "s3://bucket/run"),
        ("gcs:/bucket/run", "gcs://bucket/run"),
        ("s3a:bucket", "s3a://bucket"),
        ("az:/container/x", "az://container/x"),
    ],
)
def test_url_without_slashes_is_refused_not_saved_locally(
    in_empty_cwd: Path, text: str, fixed: str
) -> None:
    with pytest.raises(ckpt.InvalidPathError) as info:
        ckpt.Checkpointer().save(text, TREE)
    message = str(info.value)
    assert repr(text) in message and repr(fixed) in message and "./" in message
    for call in (
        lambda: ckpt.CheckpointManager(text),
        lambda: ckpt.get_backend(text),
        lambda: ckpt.checkpoint_steps(text),
        lambda: ckpt.Checkpointer().restore(text),
    ):
        with pytest.raises(ckpt.InvalidPathError):
            call()
    assert _files(in_empty_cwd) == []  # no local directory named "s3:" or "gs:bucket"


def test_explicit_local_directory_with_a_colon_still_works(in_empty_cwd: Path) -> None:
    ckpt.Checkpointer().save("./s3:/bucket/run", TREE)
    assert (in_empty_cwd / "s3:" / "bucket" / "run" / "_TREE.json").is_file()
    # A colon in a name that is no storage scheme is a plain local name.
    ckpt.Checkpointer().save("run:1", TREE)
    assert ckpt.Checkpointer().restore(in_empty_cwd / "run:1")["step"] == 3


def test_scheme_is_case_insensitive() -> None:
    assert to_path("S3://bucket/x") == to_path("s3://bucket/x")
    assert ckpt.get_backend("S3://bucket/x") is ckpt.get_backend("s3://bucket/x")
    assert ckpt.registry.scheme_of("GS://bucket/x") == "gs"
    assert to_path("FILE:///tmp/x") == to_path("/tmp/x")


def test_unknown_scheme_is_a_ckpt_error(in_empty_cwd: Path) -> None:
    for text in ("foo://x/y", "Foo://x/y"):
        with pytest.raises(ckpt.BackendNotInstalledError, match="foo://") as info:
            ckpt.Checkpointer().save(text, TREE)
        assert "Installed backends: " in str(info.value) and "s3" in str(info.value)
    with pytest.raises(ckpt.BackendNotInstalledError, match="pip install ckpt-backend-azure"):
        ckpt.Checkpointer().save("az://container/run", TREE)
    assert _files(in_empty_cwd) == []


@pytest.mark.parametrize(
    ("url", "fixed"),
    [
        ("s3://bucket/a/../b", "s3://bucket/b"),
        ("s3://bucket/run/..", "s3://bucket"),
        ("s3://bucket/./run", "s3://bucket/run"),
        ("s3://bucket/a//run", "s3://bucket/a/run"),
        ("gs://bucket/a/../b/", "gs://bucket/b"),
        ("s3a://bucket/x/./y", "s3a://bucket/x/y"),
    ],
)
def test_dot_segments_in_a_url_are_refused(url: str, fixed: str) -> None:
    with pytest.raises(ckpt.InvalidPathError) as info:
        to_path(url)
    assert url in str(info.value) and fixed in str(info.value)
    with pytest.raises(ckpt.InvalidPathError):
        to_path(UPath(url))  # a UPath made by the caller is checked too
    with pytest.raises(ckpt.InvalidPathError):
        ckpt.Checkpointer().save(url, TREE)
    with pytest.raises(ckpt.InvalidPathError):
        ckpt.CheckpointManager(url)


def test_trailing_slash_is_fine() -> None:
    assert to_path("s3://bucket/run/") == to_path("s3://bucket/run")


def test_url_without_bucket_is_refused() -> None:
    for url in ("s3:///run", "gs:///x/y"):
        with pytest.raises(ckpt.InvalidPathError, match="names no bucket"):
            to_path(url)


@pytest.mark.parametrize("value", [None, "", "   ", b"", "a\x00b", 42])
def test_empty_or_malformed_path_is_refused(value: Any) -> None:
    with pytest.raises(ckpt.InvalidPathError):
        to_path(value)
    with pytest.raises(ckpt.InvalidPathError):
        ckpt.Checkpointer().save(value, TREE)


def test_file_urls(tmp_path: Path) -> None:
    assert to_path(f"file://{tmp_path}/a/../b") == to_path(tmp_path / "b")
    assert to_path(f"file:{tmp_path}/b") == to_path(tmp_path / "b")  # RFC 8089 file:/path
    assert to_path(f"file://localhost{tmp_path}") == to_path(tmp_path)
    with pytest.raises(ckpt.InvalidPathError, match="host"):
        to_path("file://server/share/x")
    with pytest.raises(ckpt.InvalidPathError, match="relative"):
        to_path("file:relative/x")


def test_local_dot_segments_are_resolved_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with ckpt.CheckpointManager(f"{root}/sub/../runs", async_save=False) as mngr:
        mngr.save(1, TREE)
    assert (root / "runs" / "1" / "_TREE.json").is_file()
    assert not (root / "sub").exists()


_ALLOWED_PATH_ERRORS = (ckpt.InvalidPathError, ckpt.BackendNotInstalledError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=40),
        st.builds(
            lambda scheme, sep, rest: f"{scheme}{sep}{rest}",
            st.sampled_from(["s3", "S3", "gs", "gcs", "s3a", "file", "foo", "az", "C", "memory"]),
            st.sampled_from([":", ":/", "://", ":///", "//", ""]),
            st.lists(st.sampled_from(["b", "..", ".", "", "x y", "~", "%2e%2e", "a:b"]), max_size=5)
            .map("/".join),
        ),
    )
)
def test_to_path_never_crashes_and_never_keeps_dot_segments(text: str) -> None:
    """Any text: a path, or a ckpt error. A URL that is accepted holds no '.', '..' or empty
    segment (what tensorstore would normalise differently from the object store)."""
    try:
        path = to_path(text)
    except _ALLOWED_PATH_ERRORS:
        return
    assert isinstance(path, UPath)
    protocol = path.protocol if isinstance(path.protocol, str) else path.protocol[0]
    if protocol in ("", "file", "local"):
        assert os.path.isabs(path.path)
        assert ".." not in path.path.split("/")
        return
    key = str(path).split("://", 1)[1].rstrip("/").split("/")[1:]
    assert not any(s in (".", "..", "") for s in key), (text, str(path))


# -- _CHECKPOINT_METADATA -----------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A committed checkpoint without an integrity manifest (as saved before manifests):
    these tests exercise the readers' own checks. With a manifest, any change to a
    recorded file is reported as corruption first (tests/test_integrity.py)."""
    path = tmp_path / "root" / "7"
    ckpt.Checkpointer().save(path, TREE, custom_metadata={"note": "hi"})
    _without_manifest(path)
    return path


def _without_manifest(path: Path) -> None:
    doc = json.loads((path / "_TREE.json").read_text())
    del doc["manifest"]
    (path / "_TREE.json").write_text(json.dumps(doc))
    (path / ckpt.MANIFEST_FILE).unlink()


def _nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "Malformed checkpoint metadata"),
        (b"   ", "Malformed checkpoint metadata"),
        (b"{", "Malformed checkpoint metadata"),
        (b"\xff\xfe", "Malformed checkpoint metadata"),
        (b"[]", "expected a JSON object"),
        (b"null", "expected a JSON object"),
        (b'{"custom_metadata": []}', "custom_metadata"),
        (b'{"metrics": 3}', "metrics"),
        (b'{"init_timestamp_nsecs": "soon"}', "init_timestamp_nsecs"),
        (b'{"commit_timestamp_nsecs": 1.5}', "commit_timestamp_nsecs"),
        (_nested(100_000), "nested too deeply"),
        (b'{"custom_metadata": {"a": ' + _nested(50_000) + b"}}", "nested too deeply"),
        (b'{"metrics": ' + _nested(5_000, "{\"m\": ", "}").replace(b" }", b" 1}", 1) + b"}",
         "nested too deeply"),
    ],
)
def test_malformed_step_metadata(saved: Path, content: bytes, match: str) -> None:
    (saved / METADATA_FILE).write_bytes(content)
    before = _files(saved.parent)
    with pytest.raises(ValueError, match=match) as info:
        ckpt.Checkpointer().metadata(saved)
    assert str(saved / METADATA_FILE) in str(info.value)
    assert not isinstance(info.value, RecursionError)
    assert _files(saved.parent) == before  # nothing deleted


def test_oversized_step_metadata(saved: Path) -> None:
    big = b'{"custom_metadata": {"x": "' + b"a" * MAX_METADATA_BYTES + b'"}}'
    (saved / METADATA_FILE).write_bytes(big)
    with pytest.raises(ValueError, match=f"more than the {MAX_METADATA_BYTES} bytes"):
        ckpt.Checkpointer().metadata(saved)
    # The tree itself is still readable: the step metadata is not needed for a restore.
    assert ckpt.Checkpointer().restore(saved)["step"] == 3


def test_step_metadata_from_json_edge_cases() -> None:
    assert StepMetadata.from_json(b"{}") == StepMetadata()
    # Unknown keys are kept (as Orbax does), NaN metrics are read.
    meta = StepMetadata.from_json(b'{"zzz": 1, "metrics": {"loss": NaN}}')
    assert meta.custom_metadata == {"zzz": 1} and np.isnan(meta.metrics["loss"])


def test_custom_metadata_that_cannot_be_stored(tmp_path: Path) -> None:
    deep: Any = 1
    for _ in range(sys.getrecursionlimit() + 10):
        deep = {"a": deep}
    cases = [
        (deep, "nested too deeply"),
        ({"x": "a" * MAX_METADATA_BYTES}, "more than the"),
        ({"x": object()}, "JSON-serializable"),
        ([1, 2], "must be a dict"),
    ]
    for value, match in cases:
        with pytest.raises(ValueError, match=match):
            ckpt.Checkpointer().save(tmp_path / "c", TREE, custom_metadata=value)
    assert not (tmp_path / "c").exists() and _files(tmp_path) == []


# -- tree documents -------------------------------------------------------------------------------


def _tree_doc(path: Path) -> dict[str, Any]:
    return json.loads((path / tree_format.TREE_FILE).read_text())


def _write_doc(path: Path, doc: Any) -> None:
    (path / tree_format.TREE_FILE).write_text(json.dumps(doc))


def _deep_structure(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "leaf", "index": 0}
    for _ in range(depth):
        node = {"type": "list", "children": [node]}
    return node


@pytest.mark.parametrize("depth", [tree_format.MAX_TREE_DEPTH + 1, 5_000])
def test_deeply_nested_tree_document(saved: Path, depth: int) -> None:
    # Written by hand: json.dumps itself cannot nest this deep.
    text = (
        '{"format": "ckpt-tree", "version": 1, "leaves": [{"keypath": "x", "kind": "int", '
        '"value": 1}], "structure": '
        + '{"type": "list", "children": [' * depth
        + '{"type": "leaf", "index": 0}'
        + "]}" * depth
        + "}"
    )
    (saved / tree_format.TREE_FILE).write_text(text)
    with pytest.raises(ValueError, match="nested deeper than") as info:
        ckpt.Checkpointer().restore(saved)
    assert str(saved / tree_format.TREE_FILE) in str(info.value)


def test_validation_depth_limit_without_the_parser() -> None:
    """The structure check itself is iterative: a parsed document deeper than the limit is
    refused with a ValueError, not a RecursionError."""
    leaves = [{"keypath": "x", "kind": "int", "value": 1}]
    doc = {"format": "ckpt-tree", "version": 1, "leaves": leaves}
    doc["structure"] = _deep_structure(tree_format.MAX_TREE_DEPTH)
    tree_format._validate_document(doc)
    doc["structure"] = _deep_structure(50_000)
    with pytest.raises(ValueError, match="nested deeper than 512 levels"):
        tree_format._validate_document(doc)


def test_deepest_savable_tree_is_restored(tmp_path: Path) -> None:
    """Whatever the writer manages to save, the reader reads (no depth limit in between)."""
    depth = 400
    tree: Any = np.ones(2)
    for _ in range(depth):
        tree = [tree]
    ckpt.Checkpointer().save(tmp_path / "c", tree)
    out = ckpt.Checkpointer().restore(tmp_path / "c")
    for _ in range(depth):
        out = out[0]
    np.testing.assert_array_equal(out, np.ones(2))


def test_too_deep_tree_to_save_is_a_clear_error(tmp_path: Path) -> None:
    tree: Any = 1
    for _ in range(sys.getrecursionlimit() + 10):
        tree = {"k": tree}
    with pytest.raises(ValueError, match="nested too deeply") as info:
        ckpt.Checkpointer().save(tmp_path / "c", tree)
    assert str(tmp_path / "c") in str(info.value)
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    "bad_path",
    [
        "../7/arrays/0",
        "arrays/../../outside",
        "/etc/passwd",
        "arrays//0",
        "arrays/.hidden",
        "./arrays/0",
        "arrays/0/../../..",
        "",
        7,
    ],
)
def test_tree_document_naming_files_outside_its_checkpoint(
    saved: Path, tmp_path: Path, bad_path: Any
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    doc = _tree_doc(saved)
    array = next(leaf for leaf in doc["leaves"] if leaf["kind"] == "array")
    array["path"] = bad_path
    _write_doc(saved, doc)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="unsafe or missing array path") as info:
        ckpt.Checkpointer().restore(saved)
    assert str(saved) in str(info.value)
    assert _files(tmp_path) == before


@pytest.mark.parametrize("other", ["_CHECKPOINT_METADATA", "arrays", "arrays/9", "nothing"])
def test_tree_document_naming_another_file_of_its_checkpoint(saved: Path, other: str) -> None:
    doc = _tree_doc(saved)
    array = next(leaf for leaf in doc["leaves"] if leaf["kind"] == "array")
    array["path"] = other
    _write_doc(saved, doc)
    before = _files(saved)
    # Not an array there: tensorstore finds no zarr.json (translated to FileNotFoundError).
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        ckpt.Checkpointer().restore(saved)
    assert str(saved) in str(info.value)
    assert _files(saved) == before


def test_tree_document_reusing_an_array_path(saved: Path) -> None:
    ckpt.Checkpointer().save(saved.parent / "8", {"a": np.ones(2), "b": np.zeros(2)})
    _without_manifest(saved.parent / "8")
    doc = _tree_doc(saved.parent / "8")
    doc["leaves"][1]["path"] = doc["leaves"][0]["path"]
    doc["leaves"][1]["offset"] = doc["leaves"][0]["offset"]  # the same bytes of one pack
    _write_doc(saved.parent / "8", doc)
    with pytest.raises(ValueError, match="overlap"):
        ckpt.Checkpointer().restore(saved.parent / "8")
    # Two zarr arrays (leaves too large to pack) sharing a directory.
    big = np.ones(tree_format.PACK_MAX_LEAF_BYTES // 4)
    ckpt.Checkpointer().save(saved.parent / "9", {"a": big, "b": big})
    _without_manifest(saved.parent / "9")
    doc = _tree_doc(saved.parent / "9")
    doc["leaves"][1]["path"] = doc["leaves"][0]["path"]
    _write_doc(saved.parent / "9", doc)
    with pytest.raises(ValueError, match="reused"):
        ckpt.Checkpointer().restore(saved.parent / "9")


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 10, b"[]", b'"ckpt-tree"', b'{"format": "ckpt-tree"}', b"{" * 10_000],
)
def test_empty_or_malformed_tree_document(saved: Path, content: bytes) -> None:
    (saved / tree_format.TREE_FILE).write_bytes(content)
    with pytest.raises(ValueError, match="Malformed tree metadata"):
        ckpt.Checkpointer().restore(saved)


def test_oversized_tree_document(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = (saved / tree_format.TREE_FILE).stat().st_size
    monkeypatch.setattr(tree_format, "MAX_TREE_BYTES", size - 1)
    with pytest.raises(ValueError, match=f"{size} bytes, more than the {size - 1} bytes"):
        ckpt.Checkpointer().restore(saved)
    monkeypatch.setattr(tree_format, "MAX_TREE_BYTES", size)
    assert ckpt.Checkpointer().restore(saved)["step"] == 3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["type", "children", "keys", "index", "leaf", "dict", "list", "tuple", "x"]
            ),
            children,
            max_size=4,
        ),
        max_leaves=30,
    )
)
def test_validation_never_crashes_on_arbitrary_documents(structure: Any) -> None:
    """Any JSON value as a structure (and as leaves): valid, or a ValueError."""
    for doc in (
        {"format": "ckpt-tree", "version": 1, "structure": structure, "leaves": []},
        {
            "format": "ckpt-tree",
            "version": 1,
            "structure": {"type": "leaf", "index": 0},
            "leaves": [structure],
        },
    ):
        try:
            tree_format._validate_document(doc)
        except ValueError:
            pass


# -- configuration values ------------------------------------------------------------------------


def _config(cwd: Path, text: str) -> None:
    (cwd / "ckpt.toml").write_text(text, encoding="utf-8")


def _save_refused(cwd: Path, error: type[BaseException], match: str, url: Any = None) -> str:
    target = url if url is not None else cwd / "root" / "1"
    with pytest.raises(error, match=match) as info:
        ckpt.Checkpointer().save(target, TREE)
    assert _files(cwd) == ["ckpt.toml"] or _files(cwd) == []  # nothing written
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('atomicty = "rename"\n', r"'atomicty'.*Did you mean 'atomicity'"),
        ('[backend.s3]\nregion = "x"\n', r"'backend'.*Did you mean 'backends'"),
        ("atomicity = 1\n", "expected a strategy name"),
        ('atomicity = ""\n', "expected a strategy name"),
        ('atomicity = "  "\n', "expected a strategy name"),
        ("atomicity = [\"rename\"]\n", "expected a strategy name"),
        ('[backends.file]\natomicity = false\n', "expected a strategy name"),
        ('backends = "s3"\n', "one table per scheme"),
        ('[backends.s3]\nregion = "a"\n[backends.S3]\nregion = "b"\n', "two tables"),
        ("atomicity = \n", "Malformed ckpt config file"),
    ],
)
def test_bad_config_file(in_empty_cwd: Path, text: str, match: str) -> None:
    _config(in_empty_cwd, text)
    message = _save_refused(in_empty_cwd, ckpt.ConfigError, match)
    assert "ckpt.toml" in message


def test_config_file_that_is_not_utf8(in_empty_cwd: Path) -> None:
    (in_empty_cwd / "ckpt.toml").write_bytes(b'atomicity = "\xff"\n')
    _save_refused(in_empty_cwd, ckpt.ConfigError, "Malformed ckpt config file")


def test_pyproject_with_odd_tool_table(in_empty_cwd: Path) -> None:
    (in_empty_cwd / "pyproject.toml").write_text('tool = "x"\n')
    assert ckpt.strategy_for(in_empty_cwd).name == "rename"  # no ckpt config: defaults
    (in_empty_cwd / "pyproject.toml").write_text('[tool.ckpt]\natomicityy = "rename"\n')
    with pytest.raises(ckpt.ConfigError, match=r"pyproject.toml \[tool.ckpt\]"):
        ckpt.strategy_for(in_empty_cwd)


@pytest.mark.parametrize(
    ("written", "expected"),
    [(" rename ", "rename"), ("COMMIT_FILE", "commit_file"), ("Auto", "rename")],
)
def test_oddly_written_strategy_names(in_empty_cwd: Path, written: str, expected: str) -> None:
    _config(in_empty_cwd, f'atomicity = "{written}"\n')
    resolution = ckpt.registry.resolve(in_empty_cwd)
    assert resolution.name == expected and resolution.strategy.name == expected
    ckpt.Checkpointer().save(in_empty_cwd / "1", TREE)
    assert ckpt.Checkpointer().restore(in_empty_cwd / "1")["step"] == 3


def test_strategy_name_typos(in_empty_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _config(in_empty_cwd, 'atomicity = "renam"\n')
    _save_refused(in_empty_cwd, ckpt.UnknownStrategyError, "Did you mean 'rename'")
    (in_empty_cwd / "ckpt.toml").unlink()
    monkeypatch.setenv("CKPT_ATOMICITY", "comit_file")
    _save_refused(in_empty_cwd, ckpt.UnknownStrategyError, "Did you mean 'commit_file'")
    with pytest.raises(ckpt.UnknownStrategyError, match="'nope'"):
        ckpt.Checkpointer(atomicity="nope").save(in_empty_cwd / "1", TREE)
    with pytest.raises(ckpt.ConfigError, match="atomicity= argument"):
        ckpt.Checkpointer(atomicity=3).save(in_empty_cwd / "1", TREE)  # type: ignore[arg-type]
    assert _files(in_empty_cwd) == []


def test_environment_variable_values(in_empty_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_ATOMICITY", "")  # set but empty: as if unset
    assert ckpt.registry.resolve(in_empty_cwd).name == "rename"
    monkeypatch.setenv("CKPT_ATOMICITY", "  commit_file\n")
    resolution = ckpt.registry.resolve(in_empty_cwd)
    assert resolution.name == "commit_file" and resolution.source == "$CKPT_ATOMICITY"
    monkeypatch.setenv("CKPT_CONFIG", str(in_empty_cwd / "missing.toml"))
    with pytest.raises(FileNotFoundError, match="CKPT_CONFIG"):
        ckpt.Checkpointer().save(in_empty_cwd / "1", TREE)
    monkeypatch.setenv("CKPT_CONFIG", str(in_empty_cwd))  # a directory
    with pytest.raises(FileNotFoundError, match="does not name a file"):
        ckpt.Checkpointer().save(in_empty_cwd / "1", TREE)
    assert _files(in_empty_cwd) == []


def test_backend_tables_are_case_insensitive(in_empty_cwd: Path) -> None:
    _config(in_empty_cwd, '[backends.FILE]\natomicity = "commit_file"\n')
    assert ckpt.registry.resolve(in_empty_cwd).name == "commit_file"


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ('[backends.s3]\nendpoint = "http://127.0.0.1:1"\n', "Did you mean 'endpoint_url'"),
        ('[backends.s3]\nendpoint_url = "127.0.0.1:9000"\n', "expected an http"),
        ('[backends.s3]\nanon = "true"\n', "true or false"),
        ('[backends.s3]\nregion = 5\n', "non-empty string"),
        ('[backends.s3]\naws_secret_access_key = "hunter2"\n', "Credentials are never read"),
        ('[backends.gs]\nrpc_timeout_s = nan\n', "positive number"),
        ('[backends.gs]\nrename_timeout_s = -1\n', "positive number"),
        ('[backends.gs]\nlayout = "HNS!"\n', "layout must be one of"),
        ('[backends.gcs]\nbucket = "x"\n', "Unknown option"),
    ],
)
def test_bad_backend_options(in_empty_cwd: Path, table: str, match: str) -> None:
    _config(in_empty_cwd, table)
    scheme = table.split("[backends.", 1)[1].split("]", 1)[0]
    url = f"{scheme}://ckpt-test-bucket/run/1"
    message = _save_refused(in_empty_cwd, ckpt.ConfigError, match, url=url)
    assert "hunter2" not in message


# -- symlinked step directories ------------------------------------------------------------------


@pytest.fixture(params=["rename", "commit_file"])
def linked_step(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, Path]:
    """``(strategy, root, outside)``: ``root/5`` is a symlink to a committed checkpoint
    ``outside/5`` (same strategy) outside the root."""
    strategy = request.param
    root, outside = tmp_path / "root", tmp_path / "outside"
    ckpt.Checkpointer(strategy).save(outside / "5", TREE)
    root.mkdir()
    (root / "5").symlink_to(outside / "5", target_is_directory=True)
    return strategy, root, outside


def test_symlinked_step_is_never_a_checkpoint(linked_step: tuple[str, Path, Path]) -> None:
    strategy, root, outside = linked_step
    before = _files(outside)
    assert ckpt.checkpoint_steps(root, atomicity=strategy) == []
    assert ckpt.is_path_finalized(root / "5", atomicity=strategy) is False
    with ckpt.CheckpointManager(root, atomicity=strategy, async_save=False) as mngr:
        assert mngr.all_steps() == []
        with pytest.raises(FileNotFoundError, match="step 5"):
            mngr.restore(5)
        with pytest.raises(FileNotFoundError, match="step 5"):
            mngr.delete(5)
    for call in (
        lambda: ckpt.Checkpointer(strategy).restore(root / "5"),
        lambda: ckpt.Checkpointer(strategy).metadata(root / "5"),
        lambda: ckpt.Checkpointer(strategy).save(root / "5", TREE),  # no force: refused
    ):
        with pytest.raises(ValueError, match=str(root / "5")):
            call()
    assert _files(outside) == before and (root / "5").is_symlink()


def test_retention_and_cleanup_leave_symlinked_steps_alone(
    linked_step: tuple[str, Path, Path],
) -> None:
    strategy, root, outside = linked_step
    before = _files(outside)
    with ckpt.CheckpointManager(root, atomicity=strategy, max_to_keep=1) as mngr:
        for step in (1, 2, 3, 6, 7):
            mngr.save(step, TREE)
        mngr.wait_until_finished()
        assert mngr.all_steps() == [7]
    ckpt.cleanup_temporary_paths(root, atomicity=strategy)
    assert (root / "5").is_symlink() and _files(outside) == before


def test_deleting_or_replacing_a_symlinked_step_removes_only_the_link(
    linked_step: tuple[str, Path, Path],
) -> None:
    """``force=True`` and ``delete_checkpoint`` act on the name in the root: the link goes,
    the checkpoint it points to (outside the root) keeps every file, its commit marker
    included."""
    strategy, root, outside = linked_step
    before = _files(outside)
    ckpt.Checkpointer(strategy).save(root / "5", {"x": 1}, force=True)
    assert not (root / "5").is_symlink()
    assert ckpt.Checkpointer(strategy).restore(root / "5") == {"x": 1}
    assert _files(outside) == before
    (root / "6").symlink_to(outside / "5", target_is_directory=True)
    from ckpt import _sync

    backend = ckpt.get_backend(root)
    _sync.run(ckpt.delete_checkpoint(backend, to_path(root / "6")))
    assert not os.path.lexists(root / "6") and _files(outside) == before
    assert ckpt.Checkpointer(strategy).restore(outside / "5")["step"] == 3


@pytest.mark.parametrize("strategy", ["rename", "commit_file", "snapshot"])
def test_a_strategys_own_delete_of_a_symlinked_step_removes_only_the_link(
    tmp_path: Path, strategy: str
) -> None:
    """Called directly (not through ``delete_checkpoint``), a strategy's ``delete`` of a
    name that is a symlink removes the link; it used to remove the commit marker of the
    checkpoint the link points to first (through the link), uncommitting it."""
    from ckpt import _sync

    root, outside = tmp_path / "root", tmp_path / "outside"
    ckpt.Checkpointer(strategy).save(outside / "5", TREE)
    before = _files(outside)
    root.mkdir()
    (root / "5").symlink_to(outside / "5", target_is_directory=True)
    cls = ckpt.get_strategy(strategy)
    _sync.run(cls.delete(ckpt.get_backend(root), to_path(root / "5")))
    assert not os.path.lexists(root / "5") and _files(outside) == before
    assert ckpt.checkpoint_steps(outside, atomicity=strategy) == [5]


def test_symlinked_root_works(tmp_path: Path) -> None:
    """A root that is itself a symlink is the user's choice: it is followed."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with ckpt.CheckpointManager(tmp_path / "link", max_to_keep=1, async_save=False) as mngr:
        mngr.save(1, TREE)
        mngr.save(2, TREE)
        assert mngr.all_steps() == [2]
    assert sorted(p.name for p in real.iterdir()) == ["2"]
