"""What the registry does for a SQLite database: its files' mode, its pragmas, a write lock
taken without blocking the worker, and the connections storage.connections.DirectStatement reads on."""

import logging
import os
import sqlite3
import time
import weakref
from functools import partial

import sqlalchemy as sa
from sqlalchemy.sql.dml import UpdateBase

log = logging.getLogger("registry")

MMAP_BYTES = 256 * 1024 * 1024
BUSY_TIMEOUT_MS = 30000
# What SQLite's busy handler would do, but in steps of time.sleep, which gevent's workers
# patch: a worker waiting for another's write lock goes on serving its other connections.
WRITE_LOCK_FIRST_WAIT = 0.0002
WRITE_LOCK_LONGEST_WAIT = 0.002


def prepare_sqlite(engine, synchronous):
    """Make the database file private, tune every connection, take write locks cooperatively,
    and keep connections for storage.connections.DirectStatement reads."""
    if database_path := sqlite_file_of(engine.url):
        make_sqlite_files_private(database_path)
    sa.event.listen(engine, "connect", partial(tune_sqlite, synchronous=synchronous))
    sa.event.listen(engine, "before_execute", begin_before_writing)
    lookup_connections = LOOKUP_CONNECTIONS[engine] = LookupConnections(engine)
    sa.event.listen(engine, "engine_disposed", lambda engine: lookup_connections.close())


class LookupConnections:
    """Connections of storage.connections.DirectStatement's reads, outside SQLAlchemy's pool.

    A SQLite read waits on no socket, so it never lets another greenlet run: a gevent worker
    needs one such connection (a thread one each, while it reads), taken and given back
    without the pool's checkout, events and reset on return, which cost about as much as
    the read. Each is made by the engine (so it is tuned like the others) and detached from
    its pool; the reads on it are single statements, so none is left in a transaction.
    """

    def __init__(self, engine):
        self._engine = engine
        self._idle = []

    def take(self):
        try:
            return self._idle.pop()
        except IndexError:
            return self._new_connection()

    def _new_connection(self):
        try:
            pooled = self._engine.raw_connection()
        except sqlite3.Error as error:  # as SQLAlchemy raises it, for api/errors.py to answer
            raise sa.exc.DBAPIError.instance(None, None, error, sqlite3.Error) from error
        pooled.detach()
        return pooled.dbapi_connection

    def give_back(self, dbapi_connection):
        self._idle.append(dbapi_connection)

    def close(self):
        while self._idle:
            self._idle.pop().close()


LOOKUP_CONNECTIONS = weakref.WeakKeyDictionary()  # engine -> its LookupConnections, for SQLite engines


def tune_sqlite(dbapi_connection, connection_record, synchronous):
    """WAL for concurrent readers and crash safety; bench/README.md ("Writes") says
    what `synchronous` (NORMAL or FULL) trades. Memory-mapped reads: a connection whose cache
    another worker's write made stale reads its pages again without copying them."""
    cursor = dbapi_connection.cursor()
    for pragma in (
        "journal_mode=WAL",
        f"synchronous={synchronous}",
        f"busy_timeout={BUSY_TIMEOUT_MS}",
        "foreign_keys=ON",
        f"mmap_size={MMAP_BYTES}",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def begin_before_writing(connection, statement, multiparams, params, execution_options):
    """SQLAlchemy's hook for the statements it runs (the session's included): begin_writing
    before an INSERT, UPDATE or DELETE, told by the statement's kind, not its text."""
    if isinstance(statement, UpdateBase):
        begin_writing(connection.connection.dbapi_connection)


def begin_writing(dbapi_connection):
    """Begin the transaction a write is about to begin, unless one is open, with the write
    lock taken cooperatively (take_write_lock); the sqlite3 module then begins none of its own."""
    if not dbapi_connection.in_transaction:
        take_write_lock(dbapi_connection)


def take_write_lock(dbapi_connection, timeout=BUSY_TIMEOUT_MS / 1000):
    """BEGIN IMMEDIATE, retried while another connection writes, for up to `timeout` seconds.

    SQLite's own busy handler sleeps in C between its tries, which stops a gevent worker
    whole: under two workers creating providers, each spent much of its time asleep with its
    other requests waiting.
    """
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + timeout
        wait = WRITE_LOCK_FIRST_WAIT
        while True:
            try:
                cursor.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as error:
                if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(wait)
            wait = min(2 * wait, WRITE_LOCK_LONGEST_WAIT)
    finally:
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.close()


def make_sqlite_files_private(database_path):
    """Create the database file 0600 before SQLite would (0644 less the umask), and tighten
    files made earlier; SQLite gives the -wal and -shm files the database file's mode."""
    try:
        os.close(os.open(database_path, os.O_WRONLY | os.O_CREAT, 0o600))
        for path in (database_path, f"{database_path}-wal", f"{database_path}-shm"):
            if os.path.exists(path):
                os.chmod(path, 0o600)
    except OSError as error:  # SQLite's own open will say what is wrong
        log.warning("cannot make the database file %s private: %s", database_path, error.strerror)


def sqlite_file_of(url):
    """The file a SQLite URL names, or None for an in-memory or URI-form database."""
    if url.database in (None, "", ":memory:") or url.query.get("uri"):
        return None
    return url.database
