"""PII_KEY and PII_KEY_FILE (contract §1): resolved once into `Config.pii_key`, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.config import Config

KEY = "0123456789abcdef0123456789abcdef"


def config(**env: str) -> Config:
    return Config(**env)  # type: ignore[arg-type]


def error_of(**env: str) -> tuple[str, str]:
    with pytest.raises(ValidationError) as caught:
        config(**env)
    [error] = caught.value.errors()
    return str(error["loc"][0]), error["msg"]


def test_without_either_there_is_no_key() -> None:
    assert config().pii_key is None
    assert config(PII_KEY="").pii_key is None
    assert config(PII_KEY_FILE=" ").pii_key is None


def test_pii_key_is_the_key_as_bytes() -> None:
    assert config(PII_KEY=KEY).pii_key == KEY.encode()


def test_pii_key_file_is_read_once_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "pii.key"
    path.write_text(KEY + "\n")
    settings = config(PII_KEY_FILE=str(path))
    path.write_text("changed afterwards, not read again")
    assert settings.pii_key == KEY.encode()


def test_a_missing_pii_key_file_is_an_error_naming_the_variable(tmp_path: Path) -> None:
    where, message = error_of(PII_KEY_FILE=str(tmp_path / "nope"))
    assert where == "PII_KEY_FILE"
    assert "cannot read" in message and "No such file" in message


def test_a_directory_or_empty_file_is_an_error(tmp_path: Path) -> None:
    assert error_of(PII_KEY_FILE=str(tmp_path))[0] == "PII_KEY_FILE"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    where, message = error_of(PII_KEY_FILE=str(empty))
    assert (where, "is empty" in message) == ("PII_KEY_FILE", True)


def test_both_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "pii.key"
    path.write_text(KEY)
    where, message = error_of(PII_KEY=KEY, PII_KEY_FILE=str(path))
    assert where == "PII_KEY_FILE" and "both" in message


def test_a_short_key_is_refused_without_showing_it(tmp_path: Path) -> None:
    where, message = error_of(PII_KEY="short-secret")
    assert where == "PII_KEY" and "at least 16" in message and "short-secret" not in message
    path = tmp_path / "pii.key"
    path.write_text("short-secret\n")
    where, message = error_of(PII_KEY_FILE=str(path))
    assert where == "PII_KEY_FILE" and "short-secret" not in message


def test_the_key_is_never_in_the_repr(tmp_path: Path) -> None:
    path = tmp_path / "pii.key"
    path.write_text(KEY)
    for settings in (config(PII_KEY=KEY), config(PII_KEY_FILE=str(path))):
        assert KEY not in repr(settings) and KEY not in str(settings)
        assert KEY not in str(settings.model_dump())
