"""Leases, job runs and manifest syncs: what the scheduler and the manifest sync store."""

from datetime import timedelta

import sqlalchemy as sa

from models import JobRun, Lease, ManifestSync, db, utcnow


def try_lease(name, holder, seconds):
    """Take or renew the lease `name` for `seconds`; True when `holder` has it.

    Writes only to take a free or expired lease or to renew one past half its life, so
    the ticks of every jobs process cost the database a read. The conditional UPDATE settles a
    race for an existing row on every database (on PostgreSQL a waiting UPDATE re-checks
    its condition on the row its rival wrote); while no row exists one is inserted, and
    the primary key settles that race.
    """
    now = utcnow()
    lease = db.session.get(Lease, name)
    if lease is not None:
        mine, remaining = lease.holder == holder, lease.expires_at - now
        db.session.rollback()
        if not mine and remaining > timedelta(0):
            return False
        if mine and remaining > timedelta(seconds=seconds / 2):
            return True
    expires_at = now + timedelta(seconds=seconds)
    renewed = db.session.execute(
        sa.update(Lease)
        .where(Lease.name == name, sa.or_(Lease.holder == holder, Lease.expires_at < now))
        .values(holder=holder, expires_at=expires_at)
    )
    if renewed.rowcount == 0:
        if db.session.scalar(sa.select(Lease.holder).where(Lease.name == name)) is not None:
            db.session.rollback()
            return False
        db.session.add(Lease(name=name, holder=holder, expires_at=expires_at))
    try:
        db.session.commit()
        return True
    except sa.exc.IntegrityError:  # another holder inserted the first row meanwhile
        db.session.rollback()
        return False


def release_lease(name, holder):
    db.session.execute(sa.delete(Lease).where(Lease.name == name, Lease.holder == holder))
    db.session.commit()


def claim_if_due(job, interval, started_at):
    """Record a start of `job` and answer True when it is due: `interval` seconds (0: never)
    after its last start, or, for a job that also runs at start, when it has not started
    since `started_at` (the start of this server)."""
    now = utcnow()
    run = db.session.get(JobRun, job.name)
    last_started_at = run.last_started_at if run is not None else None
    due_at_start = job.at_start and (last_started_at is None or last_started_at < started_at)
    due_by_interval = interval > 0 and (last_started_at is None or now - last_started_at >= timedelta(seconds=interval))
    if not (due_at_start or due_by_interval):
        db.session.rollback()
        return False
    if run is None:
        db.session.add(JobRun(name=job.name, last_started_at=now))
    else:
        run.last_started_at = now
    db.session.commit()
    return True


def store_manifest_sync(location, outcome, error):
    """Store how the location's last sync went, in the session's transaction."""
    db.session.merge(ManifestSync(location=location, synced_at=utcnow(), outcome=outcome, error=error))


def forget_manifest_syncs_except(locations):
    """Delete the sync state of every location not in `locations`, in the session's transaction."""
    db.session.execute(sa.delete(ManifestSync).where(ManifestSync.location.not_in(locations)))


def last_manifest_syncs(locations):
    """Location -> its last ManifestSync, for those of `locations` synced before."""
    syncs = db.session.scalars(sa.select(ManifestSync).where(ManifestSync.location.in_(locations)))
    return {last_sync.location: last_sync for last_sync in syncs}
