"""The gate of the current-engine tests: the pinned chdb-core's extension, or a reason to skip."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy import current_clickhouse
from deploy.current_clickhouse import CHDB_CORE_VERSION, chdb_core_extension


def test_a_missing_chdb_core_is_a_reason_naming_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(current_clickhouse.metadata, "distribution", missing)
    with pytest.raises(LookupError, match=f"chdb-core=={CHDB_CORE_VERSION}"):
        chdb_core_extension()


def test_another_chdb_core_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(current_clickhouse.metadata, "distribution",
                        lambda name: SimpleNamespace(version="26.7.0", files=[]))
    with pytest.raises(LookupError, match="26.7.0 is installed; the tests pin"):
        chdb_core_extension()


def test_the_installed_pin_gives_the_engine_module_without_importing_chdb() -> None:
    try:
        extension = chdb_core_extension()
    except LookupError as missing:
        pytest.skip(str(missing))
    assert (extension.name, extension.parent.name) == ("_chdb.abi3.so", "chdb")
    assert extension.is_file()
    # Found from the installed files: in a fresh interpreter, the chdb package stays unimported.
    found = subprocess.run(
        [sys.executable, "-c", "import sys; from deploy.current_clickhouse import chdb_core_extension;"
         " chdb_core_extension(); print('chdb' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[3],
    )
    assert found.stdout.strip() == "False"
