"""Keyset paging, newest first, shared by every list: page tokens, ordering and counts."""

import base64
import binascii
import json
from datetime import datetime

import sqlalchemy as sa
from apifairy.exceptions import ValidationError as RequestValidationError

from models import is_storable_text
from storage.connections import read_connection


def encode_page_token(item):
    position = {"created_at": item.created_at.isoformat(), "id": item.id}
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


# Tokens this registry makes are about 100 characters; a longer one was not made here.
PAGE_TOKEN_MAX_LENGTH = 512


def decode_page_token(page_token):
    try:
        if len(page_token) > PAGE_TOKEN_MAX_LENGTH:
            raise ValueError("longer than any page token this registry makes")
        padded = page_token + "=" * (-len(page_token) % 4)
        position = json.loads(base64.urlsafe_b64decode(padded.encode()))
        created_at, row_id = datetime.fromisoformat(position["created_at"]), position["id"]
        if not (isinstance(row_id, str) and is_storable_text(row_id)):
            raise ValueError("the id is not text the database can compare")
        return created_at, row_id
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeError, RecursionError):
        raise RequestValidationError(422, {"query": {"page_token": ["Not a valid page token."]}}) from None


def collection_of(items):
    """A whole list as every list answers it (schemas.collection): its items and their count."""
    return {"items": items, "total_count": len(items)}


class NewestFirstPages:
    """Keyset pages of `rows` (a select from `table`), newest first, narrowed by named filters,
    each row made an item by `item`.

    `filters` maps each name to a clause whose bound parameter has that name. The count and
    page statements of each set of filters in use are built once: building them per request
    cost a tenth of a page of 50. The table needs `created_at` and `id` columns, and the
    items must carry them as attributes.
    """

    def __init__(self, table, rows, filters, item):
        self.table = table
        self.rows = rows
        self.filters = filters
        self.item = item
        self._statements = {}

    def statements(self, filter_names, after_a_position):
        key = (filter_names, after_a_position)
        if key not in self._statements:
            self._statements[key] = self._build_statements(filter_names, after_a_position)
        return self._statements[key]

    def _build_statements(self, filter_names, after_a_position):
        where = [self.filters[name] for name in filter_names]
        count_query = sa.select(sa.func.count()).select_from(self.table).where(*where)
        created_at, row_id = self.table.c.created_at, self.table.c.id
        page_query = self.rows.where(*where)
        if after_a_position:
            after = (
                sa.bindparam("after_created_at", type_=created_at.type),
                sa.bindparam("after_id", type_=row_id.type),
            )
            page_query = page_query.where(sa.tuple_(created_at, row_id) < sa.tuple_(*after))
        return count_query, page_query.order_by(created_at.desc(), row_id.desc()).limit(sa.bindparam("limit"))

    def page(self, filter_values, limit, page_token=None):
        """One page as the page schema expects it; `filter_values` names the filters to apply."""
        count_query, page_query = self.statements(tuple(sorted(filter_values)), bool(page_token))
        parameters = {**filter_values, "limit": limit + 1}
        if page_token:
            parameters["after_created_at"], parameters["after_id"] = decode_page_token(page_token)
        connection = read_connection()
        total_count = connection.scalar(count_query, parameters)
        items = [self.item(row) for row in connection.execute(page_query, parameters)]
        has_more = len(items) > limit
        items = items[:limit]
        return {
            "items": items,
            "total_count": total_count,
            "has_more": has_more,
            "next_page_token": encode_page_token(items[-1]) if has_more else None,
        }
