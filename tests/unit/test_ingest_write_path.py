"""Pure helpers of the ingest write path (services/ingest/pipeline.py, services/ingest/store/pg.py): the garbage
collector pause around ``Pipeline.process`` calls, array literals and the 1M upsert's parameter layout."""

from __future__ import annotations

import gc

import pytest

from services.ingest.pipeline import _gc_paused
from services.ingest.store import pg


def test_gc_paused_during_nested_calls_and_restored_after_errors() -> None:
    assert gc.isenabled()
    with _gc_paused():
        assert not gc.isenabled()
        with _gc_paused():  # a second pipeline of the same process
            assert not gc.isenabled()
        assert not gc.isenabled()  # still inside the first call
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_gc_left_off_when_it_was_off() -> None:
    gc.disable()
    try:
        with _gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_pg_array_literals() -> None:
    assert pg.pg_array([1, None, -3, 1_786_940_580_000_000]) == "{1,NULL,-3,1786940580000000}"
    assert pg.pg_array([]) == "{}"
    assert pg.pg_array(["NIFTY", None, 'a"b', "c\\d", "NIFTY"], text=True) == '{"NIFTY",NULL,"a\\"b","c\\\\d","NIFTY"}'


def test_upsert_1m_parameter_rows_cover_every_column_once() -> None:
    types = pg._upsert_1m_arg_types()
    assert len(types) == 37
    rows = pg._UPSERT_1M_FLOAT_ROWS + pg._UPSERT_1M_INT_ROWS
    assert sorted(rows) == list(range(2, 37))
    assert all(types[i] == "float8[]" for i in pg._UPSERT_1M_FLOAT_ROWS)
    assert all(types[i] in ("int8[]", "int4[]") for i in pg._UPSERT_1M_INT_ROWS)
