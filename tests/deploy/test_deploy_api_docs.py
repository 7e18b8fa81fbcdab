"""docs/api.md holds the request-field table exactly as server.api.protocol.FIELDS renders it."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_fields_table_matches_protocol():
    from server.api.protocol import fields_markdown

    text = DOC.read_text(encoding="utf-8")
    begin, end = "<!-- fields table: generated from server.api.protocol.FIELDS -->\n", "<!-- end fields table -->"
    assert begin in text and end in text
    table = text.split(begin, 1)[1].split(end, 1)[0]
    assert table == fields_markdown(), (
        "docs/api.md's field table is stale; paste server.api.protocol.fields_markdown() between the markers"
    )
