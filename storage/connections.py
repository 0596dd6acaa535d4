"""The one connection policy: which connection a read or a write runs on, and none held
while a request waits.

Reads that are only shown run on one read connection per app context (or, for the hot
single-row reads, a private compiled fast path); every write goes through the session.
"""

import logging
import sqlite3
from collections import namedtuple
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import sqlalchemy as sa
from flask import g, has_app_context

from models import db
from storage.sqlite import LOOKUP_CONNECTIONS, begin_writing, take_write_lock

log = logging.getLogger(__name__)

POSTGRESQL_DISK_FULL = "53100"  # SQLSTATE disk_full


def read_connection():
    """The app context's connection for plain reads: credentials, and rows that are only shown.

    The ORM session costs as much again as such a read, so these bypass it, and share one
    connection per request; what a request changes goes through the session. Closed when
    the app context ends (close_read_connection).
    """
    connection = g.get("read_connection")
    if connection is None:
        connection = g.read_connection = db.engine.connect()
    return connection


def close_read_connection(exception=None):
    connection = g.pop("read_connection", None)
    if connection is not None:
        connection.close()


def end_session():
    """db.session.remove(), the Session dropped even when its close fails."""
    try:
        db.session.remove()
    finally:
        db.session.registry.clear()


def end_connections(exception=None):
    """Give back the session's connection and the read connection: at the end of a request
    (while its context, and so its request id, is still there for the log), and of any other
    app context.

    A connection lost after the answer was chosen (PostgreSQL restarted, the backend ended)
    fails the rollback that ends it. That is logged and the answer stands: a request commits
    what it changes before it answers, so the rollback had nothing to undo, and its failure
    has already dropped the lost connection from the pool.
    """
    if "read_connection" not in g and not db.session.registry.has():
        return  # nothing to give back: the request's own teardown already did
    for end in (end_session, close_read_connection):
        try:
            end()
        except sa.exc.SQLAlchemyError as error:
            log.warning("a database connection was lost as it was given back (the answer stands): %s", cause_of(error))


def cause_of(error):
    """What the driver said, without SQLAlchemy's statement and link."""
    return getattr(error, "orig", None) or error


def is_disk_full(error):
    """A statement refused for want of space: SQLite's SQLITE_FULL (its disk, or its
    max_page_count), PostgreSQL's disk_full."""
    cause = cause_of(error)
    return (
        getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or getattr(cause, "sqlstate", None) == POSTGRESQL_DISK_FULL
    )


def is_unavailable(error):
    """A database error that says the database cannot be reached or used now (down, a
    connection lost, a lock not had in time), not that a statement was wrong."""
    return isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError) or getattr(
        error, "connection_invalidated", False
    )


@sa.event.listens_for(sa.orm.Session, "after_transaction_create")
def one_pooled_connection_per_request(session, transaction):
    """A request's session about to take a connection (to write) gives back the read
    connection first: a burst of writers each holding a read connection (from checking
    their credentials) and waiting for a session connection would wait on one another
    until the pool's timeout."""
    if transaction.parent is None and has_app_context():
        close_read_connection()


class DirectStatement:
    """A fixed Core read with named parameters, run on a DBAPI cursor: compiled once per
    database (and set of parameter names), its parameters and values converted as SQLAlchemy
    would convert them, each row made by `make_row` (a named tuple of the returned columns by
    default).

    The hot path of every request is one or two reads (its credentials, the provider it
    names, the providers of the model a gateway call names). Through SQLAlchemy's execution
    such a read costs several times what the driver does with it (bench/README.md); every
    other statement, and every write, goes through SQLAlchemy.
    """

    def __init__(self, statement, make_row=None):
        self.statement = statement
        self.make_row = make_row or namedtuple("Row", statement.exported_columns.keys())
        self._compiled = {}  # (dialect name, driver, parameter names) -> CompiledStatement

    def first(self, **parameters):
        """The first row a read finds, or None. On SQLite the read runs on a connection kept
        for such reads (sqlite.LookupConnections), elsewhere on the request's read connection."""
        rows = self._read(parameters, every_row=False)
        return rows[0] if rows else None

    def all(self, **parameters):
        """Every row a read finds, in its order, read as `first` reads."""
        return self._read(parameters, every_row=True)

    def first_on(self, transaction, **parameters):
        """The first row in a DirectTransaction (direct_transaction's)."""
        rows = self._rows(transaction.dbapi_connection, transaction.dialect, parameters, every_row=False)
        return rows[0] if rows else None

    def _read(self, parameters, every_row):
        engine = db.engine
        lookup_connections = LOOKUP_CONNECTIONS.get(engine)
        if lookup_connections is None:
            return self._rows(read_connection().connection, engine.dialect, parameters, every_row)
        dbapi_connection = lookup_connections.take()
        try:
            return self._rows(dbapi_connection, engine.dialect, parameters, every_row)
        finally:
            lookup_connections.give_back(dbapi_connection)

    def _rows(self, dbapi_connection, dialect, parameters, every_row):
        """The rows the statement returns (with `every_row` False, at most the first)."""
        compiled = self._compiled_for(dialect, parameters)
        driver_parameters = compiled.driver_parameters(parameters)
        dbapi_error = dialect.loaded_dbapi.Error
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(compiled.sql, driver_parameters)
            if not compiled.returns_rows:  # a write that returns nothing
                rows = []
            elif every_row:
                rows = cursor.fetchall()
            else:
                rows = [row] if (row := cursor.fetchone()) is not None else []
        except dbapi_error as error:  # as SQLAlchemy raises it, for api/errors.py to answer
            raise sa.exc.DBAPIError.instance(compiled.sql, driver_parameters, error, dbapi_error) from error
        finally:
            cursor.close()
        return [self.make_row(*compiled.values_of(row)) for row in rows]

    def _compiled_for(self, dialect, parameters):
        key = (dialect.name, dialect.driver, frozenset(parameters))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = CompiledStatement.of(self.statement, dialect, key[2])
        return compiled


@dataclass(frozen=True)
class CompiledStatement:
    sql: str
    parameter_names: tuple  # in the order of a positional paramstyle's placeholders
    positional: bool
    fixed_values: dict  # parameter name -> the value the statement holds (a literal)
    bind_processors: tuple  # (parameter name, function) of each parameter whose values are converted
    returns_rows: bool
    converted_columns: tuple  # (position, function) of each returned column whose values are converted

    @classmethod
    def of(cls, statement, dialect, parameter_names):
        compiled = statement.compile(dialect=dialect, column_keys=list(parameter_names))
        names = compiled.positiontup or list(dict.fromkeys(compiled.bind_names.values()))
        binds = {name: compiled.binds[name] for name in names}
        return cls(
            compiled.string,
            tuple(names),
            compiled.positiontup is not None,
            {name: bind.value for name, bind in binds.items() if not bind.required},
            tuple(
                (name, process)
                for name, bind in binds.items()
                if (process := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
            ),
            bool(statement.exported_columns),
            tuple(
                (position, process)
                for position, column in enumerate(statement.exported_columns)
                if (process := column.type.dialect_impl(dialect).result_processor(dialect, None)) is not None
            ),
        )

    def driver_parameters(self, parameters):
        values = self.fixed_values | parameters
        for name, process in self.bind_processors:
            values[name] = process(values[name])
        # A parameter used twice stands twice among positional placeholders (converted once).
        return [values[name] for name in self.parameter_names] if self.positional else values

    def values_of(self, row):
        values = list(row)
        for position, process in self.converted_columns:
            values[position] = process(values[position])
        return values


@contextmanager
def dbapi_connection_of(engine):
    """A DBAPI connection for a while: on SQLite one kept for direct statements, else a pooled one."""
    lookup_connections = LOOKUP_CONNECTIONS.get(engine)
    if lookup_connections is None:
        dbapi_error = engine.dialect.loaded_dbapi.Error
        try:
            pooled = engine.raw_connection()
        except dbapi_error as error:  # as SQLAlchemy raises it (errors.py maps OperationalError to 503)
            raise sa.exc.DBAPIError.instance(None, None, error, dbapi_error) from error
        try:
            yield pooled.dbapi_connection
        finally:
            pooled.close()
        return
    dbapi_connection = lookup_connections.take()
    try:
        yield dbapi_connection
    finally:
        lookup_connections.give_back(dbapi_connection)


# What DirectStatement.first_on runs in: the DBAPI connection and its dialect, looked up once.
DirectTransaction = namedtuple("DirectTransaction", "dbapi_connection dialect")


@contextmanager
def direct_transaction():
    """One short transaction on a DBAPI connection of its own, outside the session, for
    DirectStatements (`first_on`): a DirectTransaction, committed when the block ends, rolled
    back if it raises. On SQLite the write lock is taken first (cooperatively).

    The write every call of a limited token makes (storage/limits.py) runs so: through the
    session it cost several times as much (bench/README.md).
    """
    engine = db.engine
    dbapi_error = engine.dialect.loaded_dbapi.Error
    with dbapi_connection_of(engine) as dbapi_connection:
        try:
            if engine.dialect.name == "sqlite":
                take_write_lock(dbapi_connection)
            yield DirectTransaction(dbapi_connection, engine.dialect)
            dbapi_connection.commit()
        except BaseException as error:
            with suppress(dbapi_error):
                dbapi_connection.rollback()
            if isinstance(error, dbapi_error):  # the commit's, or the write lock's
                raise sa.exc.DBAPIError.instance(None, None, error, dbapi_error) from error
            raise


def session_connection():
    """The session's connection, its transaction begun when none is: Core writes run on it, in
    the transaction of the session's other changes, without the ORM's unit of work."""
    return db.session.connection()


def session_writing():
    """The session's DBAPI connection, its transaction begun (when none is) for writing: on
    SQLite with the write lock taken cooperatively (sqlite.begin_writing)."""
    dbapi_connection = db.session.connection().connection.dbapi_connection
    if db.engine.dialect.name == "sqlite":
        begin_writing(dbapi_connection)
    return dbapi_connection


@contextmanager
def no_connection():
    """Hold no database connection or transaction while the body waits (on an upstream, a
    slow hash, a client); usable as a decorator too.

    Ends the session's transaction (a commit: nothing is pending before a wait; objects keep
    their values, expire_on_commit being off) and closes the read connection; the next
    statement, after the wait, checks a connection out anew. A request that has not used
    the session (a gateway call reads through direct statements) has none to end.
    """
    if db.session.registry.has():
        db.session.commit()
    close_read_connection()
    yield
