"""Exports as HTTP: a JSONL stream of preference pairs, and its OpenAPI declaration."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi.responses import StreamingResponse

from api.errors import responses
from api.formats import export_record
from store.db import Database
from store.exports import PairExport, preference_pairs
from store.feedback import conversation_pairs

EXPORT_RESPONSES = {
    200: {
        "description": "JSONL, one preference pair a line (with \"strength\" when the rater gave one); ties are "
        "left out (no format has them) and counted in the X-Ratchet-Skipped-Ties header. trl-conversational "
        "writes a chat prompt's messages, and a plain-text prompt's HH-RLHF turns as messages",
        "content": {"application/jsonl": {"schema": {"type": "string"}}},
    },
    **responses(401, 403, 404, 422),
}


def export_response(database: Database, export: PairExport, fmt: str, filename: str) -> StreamingResponse:
    """Stream the pairs of ``export`` as ``fmt`` JSONL, as the attachment ``filename``; a conversational
    export reads each pair's prompt messages too (``store.feedback.conversation_pairs``)."""

    def lines() -> Iterator[bytes]:
        if fmt == "trl-conversational":
            for pair in conversation_pairs(database, batch_ids=export.batch_ids):
                yield export_record(fmt, prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected,
                                    strength=pair.strength, messages=pair.messages)
            return
        for pair in preference_pairs(database, batch_ids=export.batch_ids):
            yield export_record(fmt, prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected,
                                strength=pair.strength)

    return StreamingResponse(
        lines(),
        media_type="application/jsonl",
        headers={
            "X-Ratchet-Skipped-Ties": str(export.skipped_ties),
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )
