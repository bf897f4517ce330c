"""The fast fetch loop is only installed on the Faust versions it was copied from."""

from __future__ import annotations

from types import SimpleNamespace

import faust

from streams import fastpath


def test_the_fast_loop_replaces_faust_s_on_the_version_it_was_copied_from(monkeypatch):
    monkeypatch.setattr(faust, "__version__", "0.15.3")
    consumer = SimpleNamespace(_drain_messages="faust's")
    assert fastpath.install(consumer)
    assert consumer._drain_messages.__func__ is fastpath.drain_messages


def test_another_faust_version_keeps_its_own_loop(monkeypatch, caplog):
    monkeypatch.setattr(faust, "__version__", "0.16.0")
    consumer = SimpleNamespace(_drain_messages="faust's")
    assert not fastpath.install(consumer)
    assert consumer._drain_messages == "faust's"
    assert "running Faust's own fetch loop" in caplog.text
