"""Keyset paging, newest first, shared by every list: page tokens, ordering and counts."""

import base64
import binascii
import json
from datetime import datetime

import sqlalchemy as sa
from apifairy.exceptions import ValidationError as RequestValidationError

from models import db, is_storable_text


def encode_page_token(row):
    position = {"created_at": row.created_at.isoformat(), "id": row.id}
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def decode_page_token(page_token):
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        position = json.loads(base64.urlsafe_b64decode(padded.encode()))
        created_at, row_id = datetime.fromisoformat(position["created_at"]), position["id"]
        if not (isinstance(row_id, str) and is_storable_text(row_id)):
            raise ValueError("the id is not text the database can compare")
        return created_at, row_id
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeError):
        raise RequestValidationError(422, {"query": {"page_token": ["Not a valid page token."]}}) from None


def newest_first_page(model, filters, limit, page_token=None):
    """One page of `model` rows matching `filters`, as the page schema expects it."""
    total_count = db.session.scalar(sa.select(sa.func.count()).select_from(model).where(*filters))
    query = sa.select(model).where(*filters)
    if page_token:
        created_at, row_id = decode_page_token(page_token)
        query = query.where(sa.tuple_(model.created_at, model.id) < sa.tuple_(created_at, row_id))
    rows = db.session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).all()
    has_more = len(rows) > limit
    items = rows[:limit]
    return {
        "items": items,
        "total_count": total_count,
        "has_more": has_more,
        "next_page_token": encode_page_token(items[-1]) if has_more else None,
    }
