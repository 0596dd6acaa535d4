"""Providers and their model index rows: every statement that reads or writes them, and the
edit rules.

An edit (by the API or a manifest) is made WHERE version = the version read and adds one
to it, so that a change racing another fails instead of storing a mix; a write that
changes nothing a user sees (a listing, a probe) keeps version and updated_at.
"""

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from models import (
    PROVIDER_COLUMNS,
    PROVIDER_MODELS,
    PROVIDER_ROWS,
    PROVIDERS,
    Provider,
    db,
    provider_of,
    providers_of,
    utcnow,
)
from storage.connections import DirectStatement, read_connection, session_connection
from storage.paging import NewestFirstPages

PROVIDER_BY_ID = DirectStatement(PROVIDER_ROWS.where(PROVIDERS.c.id == sa.bindparam("provider_id")), Provider)
PROVIDER_ID_BY_BASE_URL = DirectStatement(
    sa.select(PROVIDERS.c.id).where(PROVIDERS.c.base_url == sa.bindparam("base_url"))
)
INSERT_PROVIDER = sa.insert(PROVIDERS).returning(*PROVIDER_COLUMNS)
EDIT_PROVIDER = (
    sa.update(PROVIDERS)
    .where(PROVIDERS.c.id == sa.bindparam("provider_id"), PROVIDERS.c.version == sa.bindparam("read_version"))
    .values(version=PROVIDERS.c.version + 1)
    .returning(*PROVIDER_COLUMNS)
)
# Written without an edit: version and updated_at keep their values.
UNEDITED = {"updated_at": PROVIDERS.c.updated_at}


def provider_by_id(provider_id):
    """The stored provider with this id, or None."""
    return PROVIDER_BY_ID.first(provider_id=provider_id)


def owner_of_base_url(base_url):
    """The id of the provider registered with this base_url, or None."""
    owner = PROVIDER_ID_BY_BASE_URL.first(base_url=base_url)
    return None if owner is None else owner.id


def insert_provider(values):
    """Insert a provider in the session's transaction; the provider as written."""
    return provider_of(session_connection().execute(INSERT_PROVIDER, values))


def insert_providers(values_of_providers):
    db.session.execute(sa.insert(PROVIDERS), values_of_providers)


def edit_provider(provider_id, read_version, values):
    """Store an edit of the provider in the session's transaction, if it is still at
    `read_version`: the provider as written, or None when it was changed or deleted meanwhile."""
    parameters = {**values, "provider_id": provider_id, "read_version": read_version}
    return provider_of(session_connection().execute(EDIT_PROVIDER, parameters))


def remove_provider(provider_id, read_version=None):
    """Delete the provider in the session's transaction (with `read_version`, only if it is
    still at that version); whether it was deleted."""
    deletion = sa.delete(PROVIDERS).where(PROVIDERS.c.id == provider_id)
    if read_version is not None:
        deletion = deletion.where(PROVIDERS.c.version == read_version)
    return db.session.execute(deletion).rowcount == 1


def delete_providers(provider_ids):
    db.session.execute(sa.delete(PROVIDERS).where(PROVIDERS.c.id.in_(provider_ids)))


def replace_model_list(provider_id, index_rows, listed, read_version=None):
    """Make the index hold `index_rows` as the provider's list, in the session's transaction;
    `listed` false leaves it no list (models_listed_at null). With `read_version`, only if
    the provider is still at that version. True when written."""
    db.session.flush()  # the provider's own pending write first: its models refer to it
    stamp = (
        sa.update(PROVIDERS)
        .where(PROVIDERS.c.id == provider_id)
        .values(models_listed_at=utcnow() if listed else None, **UNEDITED)
    )
    if read_version is not None:
        stamp = stamp.where(PROVIDERS.c.version == read_version)
    if db.session.execute(stamp).rowcount == 0:
        return False
    db.session.execute(sa.delete(PROVIDER_MODELS).where(PROVIDER_MODELS.c.provider_id == provider_id))
    if index_rows:
        db.session.execute(sa.insert(PROVIDER_MODELS), index_rows)
    return True


def sealed_api_keys():
    """(id, sealed_api_key) of every stored provider, in the session's transaction."""
    return db.session.execute(sa.select(PROVIDERS.c.id, PROVIDERS.c.sealed_api_key)).all()


def replace_sealed_api_key(provider_id, sealed_api_key, resealed_api_key):
    """Store the same key sealed anew, unless the provider's key changed since it was read
    (`sealed_api_key`), in the session's transaction; True when stored. Not an edit."""
    reseal = (
        sa.update(PROVIDERS)
        .where(PROVIDERS.c.id == provider_id, PROVIDERS.c.sealed_api_key == sealed_api_key)
        .values(sealed_api_key=resealed_api_key, **UNEDITED)
    )
    return db.session.execute(reseal).rowcount == 1


PROVIDER_PAGES = NewestFirstPages(
    PROVIDERS,
    PROVIDER_ROWS,
    {
        "type": PROVIDERS.c.type == sa.bindparam("type"),
        "state": PROVIDERS.c.state == sa.bindparam("state"),
        "registry": PROVIDERS.c.registry == sa.bindparam("registry"),
        "capability": PROVIDERS.c.type.in_(sa.bindparam("capability", expanding=True)),
    },
    Provider.from_row,
)


def providers_page(filter_values, limit, page_token):
    return PROVIDER_PAGES.page(filter_values, limit, page_token)


def all_providers():
    return providers_of(read_connection().execute(PROVIDER_ROWS))


def providers_of_location(location):
    """The providers a manifest location manages, in the session's transaction (a sync's edits follow)."""
    return providers_of(db.session.execute(PROVIDER_ROWS.where(PROVIDERS.c.registry == location)))


def first_clash(location, base_urls):
    """The first provider (by base_url) holding one of `base_urls` that the location does not manage, or None."""
    return provider_of(
        db.session.execute(
            PROVIDER_ROWS.where(PROVIDERS.c.base_url.in_(base_urls), PROVIDERS.c.registry.is_distinct_from(location))
            .order_by(PROVIDERS.c.base_url)
            .limit(1)
        )
    )


def delete_providers_of_location(location):
    """Delete every provider the location manages, in the session's transaction; their ids."""
    deletion = sa.delete(PROVIDERS).where(PROVIDERS.c.registry == location).returning(PROVIDERS.c.id)
    return db.session.execute(deletion).scalars().all()


def locations_other_than(locations):
    """The manifest locations, other than `locations`, that manage a stored provider."""
    return db.session.scalars(
        sa.select(PROVIDERS.c.registry)
        .distinct()
        .where(PROVIDERS.c.registry.is_not(None), PROVIDERS.c.registry.not_in(locations))
    ).all()


def provider_counts_of_locations(locations):
    """Location -> how many providers it manages, for those of `locations` that manage any."""
    counts = (
        sa.select(PROVIDERS.c.registry, sa.func.count())
        .where(PROVIDERS.c.registry.in_(locations))
        .group_by(PROVIDERS.c.registry)
    )
    return dict(db.session.execute(counts).all())


PROVIDER_COUNTS = sa.select(PROVIDERS.c.type, PROVIDERS.c.state, sa.func.count()).group_by(
    PROVIDERS.c.type, PROVIDERS.c.state
)


def provider_counts():
    """(type, state, count) of the stored providers."""
    return read_connection().execute(PROVIDER_COUNTS).all()


INDEXED_MODEL_COLUMNS = (
    PROVIDER_MODELS.c.upstream_id,
    PROVIDER_MODELS.c.created,
    PROVIDER_MODELS.c.owned_by,
    PROVIDER_MODELS.c.display_name,
    PROVIDERS.c.id.label("provider_id"),
    PROVIDERS.c.type,
)
INDEXED_MODELS = sa.select(*INDEXED_MODEL_COLUMNS).join_from(PROVIDER_MODELS, PROVIDERS)
MODELS_OF_PROVIDER = INDEXED_MODELS.where(PROVIDER_MODELS.c.provider_id == sa.bindparam("provider_id")).order_by(
    PROVIDER_MODELS.c.position
)
# Oldest provider first, so a model served by several is shown with the one routing tries first.
ONLINE_MODELS = INDEXED_MODELS.where(PROVIDERS.c.state == "online").order_by(
    PROVIDERS.c.created_at, PROVIDERS.c.id, PROVIDER_MODELS.c.position
)
ONLINE_MODELS_OF_TYPES = ONLINE_MODELS.where(PROVIDERS.c.type.in_(sa.bindparam("types", expanding=True)))
ONLINE_MODEL_REFS_OF_TYPES = (
    sa.select(PROVIDERS.c.type, PROVIDER_MODELS.c.upstream_id)
    .join_from(PROVIDER_MODELS, PROVIDERS)
    .where(PROVIDERS.c.state == "online", PROVIDERS.c.type.in_(sa.bindparam("types", expanding=True)))
    .distinct()
)
# Read on every gateway call: a direct statement.
PROVIDERS_LISTING = DirectStatement(
    PROVIDER_ROWS.join_from(PROVIDERS, PROVIDER_MODELS)
    .where(PROVIDERS.c.type == sa.bindparam("type"), PROVIDER_MODELS.c.upstream_id == sa.bindparam("upstream_id"))
    .order_by(PROVIDERS.c.created_at, PROVIDERS.c.id),
    Provider,
)


MODEL_COUNTS = (
    sa.select(PROVIDER_MODELS.c.provider_id, sa.func.count())
    .where(PROVIDER_MODELS.c.provider_id.in_(sa.bindparam("provider_ids", expanding=True)))
    .group_by(PROVIDER_MODELS.c.provider_id)
)


def model_counts(provider_ids):
    """Provider id -> how many models its index holds, for those of `provider_ids` that hold any."""
    return dict(read_connection().execute(MODEL_COUNTS, {"provider_ids": list(provider_ids)}).all())


def models_of_provider(provider_id):
    """The provider's indexed models (mappings of INDEXED_MODEL_COLUMNS), as its upstream listed them."""
    return read_connection().execute(MODELS_OF_PROVIDER, {"provider_id": provider_id}).mappings()


def online_models(types=None):
    """Indexed models of the online providers (of `types`, when given), oldest provider first."""
    if types is None:
        return read_connection().execute(ONLINE_MODELS).mappings()
    return read_connection().execute(ONLINE_MODELS_OF_TYPES, {"types": types}).mappings()


def online_model_refs(types):
    """(type, upstream id) of every model an online provider of `types` lists, each once."""
    return read_connection().execute(ONLINE_MODEL_REFS_OF_TYPES, {"types": types}).all()


def providers_listing(provider_type, upstream_id):
    """The providers of the type whose indexed list has the upstream id, oldest first."""
    return PROVIDERS_LISTING.all(type=provider_type, upstream_id=upstream_id)


# Probe outcomes


class json_array_elements(FunctionElement):
    """The elements of a JSON array parameter, as rows of one column, `value`."""

    inherit_cache = True
    name = "json_array_elements"


@compiles(json_array_elements)
def sqlite_json_each(element, compiler, **kw):
    return f"json_each({compiler.process(element.clauses, **kw)})"


@compiles(json_array_elements, "postgresql")
def postgresql_json_array_elements(element, compiler, **kw):
    return f"json_array_elements({compiler.process(element.clauses, **kw)})"


def json_rows(name):
    """The rows of the JSON array parameter `name`, as a table."""
    return json_array_elements(sa.bindparam(name, type_=sa.JSON)).table_valued("value").alias(name)


def field(rows, key):
    return sa.type_coerce(rows.c.value, sa.JSON)[key]


def recorded_now(target_ids):
    """The ids among the parameter `target_ids` whose probe this batch recorded."""
    return sa.select(PROVIDERS.c.id).where(
        PROVIDERS.c.id.in_(sa.bindparam(target_ids, expanding=True)), PROVIDERS.c.last_checked_at == CHECKED_AT
    )


CHECKED_AT = sa.bindparam("checked_at", type_=PROVIDERS.c.last_checked_at.type)
OUTCOMES = json_rows("outcomes")
# UPDATE ... FROM: SQLite 3.33 or later.
RECORD_OUTCOMES = (
    sa.update(PROVIDERS)
    .where(
        PROVIDERS.c.id == field(OUTCOMES, "target_id").as_string(),
        PROVIDERS.c.version == field(OUTCOMES, "read_version").as_integer(),
    )
    .values(
        state=field(OUTCOMES, "state").as_string(),
        consecutive_failures=field(OUTCOMES, "consecutive_failures").as_integer(),
        last_error=field(OUTCOMES, "last_error").as_string(),
        last_checked_at=CHECKED_AT,
        models_listed_at=sa.case(
            (field(OUTCOMES, "listed").as_boolean(), CHECKED_AT), else_=PROVIDERS.c.models_listed_at
        ),
        **UNEDITED,
    )
)
RECORDED = recorded_now("target_ids")
LISTINGS_RECORDED = recorded_now("listed_ids")
FORMER_MODELS = sa.delete(PROVIDER_MODELS).where(PROVIDER_MODELS.c.provider_id.in_(LISTINGS_RECORDED))
INDEX_ROWS = json_rows("index_rows")
LISTED_MODELS = sa.insert(PROVIDER_MODELS).from_select(
    ["provider_id", "upstream_id", "position", "created", "owned_by", "display_name"],
    sa.select(
        field(INDEX_ROWS, "provider_id").as_string(),
        field(INDEX_ROWS, "upstream_id").as_string(),
        field(INDEX_ROWS, "position").as_integer(),
        sa.cast(field(INDEX_ROWS, "created").as_string(), sa.BigInteger),  # as_integer casts to a 32-bit INTEGER
        field(INDEX_ROWS, "owned_by").as_string(),
        field(INDEX_ROWS, "display_name").as_string(),
    ).where(field(INDEX_ROWS, "provider_id").as_string().in_(LISTINGS_RECORDED)),
)


def record_probes(parameters):
    """Store a batch of probe outcomes in the session's transaction, in three statements; the
    ids of the providers it recorded.

    `parameters` are JSON: "outcomes" (target_id, read_version, state, consecutive_failures,
    last_error, listed), "target_ids", "listed_ids" and "index_rows", with "checked_at".
    Nothing is stored for a provider edited or deleted since it was read; a failed listing
    keeps the last list.
    """
    db.session.execute(RECORD_OUTCOMES, parameters)
    if parameters["listed_ids"]:
        db.session.execute(FORMER_MODELS, parameters)
        db.session.execute(LISTED_MODELS, parameters)
    return set(db.session.scalars(RECORDED, parameters))
