"""Schema DDL and numbered migrations, one list per dialect.

Migration ``n`` (1-based) is ``MIGRATIONS[dialect][n - 1]``: a list of statements. They must be
idempotent (``IF NOT EXISTS``) because on MySQL DDL commits implicitly, so two servers starting
at once may both run the statements of one step; only the compare-and-set of the version row
(``UPDATE schema_version SET version = n WHERE version = n - 1``) is decided exactly once.
On SQLite a step runs inside ``BEGIN IMMEDIATE`` and is atomic.
"""
from __future__ import annotations

_MYSQL_TAIL = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"

SCHEMA_VERSION_DDL = {
    "sqlite": "CREATE TABLE IF NOT EXISTS schema_version ("
    " id INTEGER NOT NULL PRIMARY KEY, version INTEGER NOT NULL)",
    "mysql": "CREATE TABLE IF NOT EXISTS schema_version ("
    " id TINYINT NOT NULL PRIMARY KEY, version INT NOT NULL)" + _MYSQL_TAIL,
}

_SQLITE_V1 = [
    """CREATE TABLE IF NOT EXISTS servers (
        id TEXT NOT NULL PRIMARY KEY,
        address TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS apps (
        name TEXT NOT NULL PRIMARY KEY,
        owner TEXT NULL,
        epoch INTEGER NOT NULL DEFAULT 0,
        token_hash TEXT NULL,
        updated_at REAL NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS ix_apps_owner ON apps (owner)",
    """CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        app TEXT NOT NULL,
        name TEXT NOT NULL,
        handler TEXT NOT NULL,
        schedule_type TEXT NOT NULL,
        schedule_expr TEXT NOT NULL DEFAULT '',
        timezone TEXT NOT NULL DEFAULT 'UTC',
        params TEXT NULL,
        timeout REAL NULL,
        retry_times INTEGER NOT NULL DEFAULT 0,
        retry_backoff REAL NOT NULL DEFAULT 1,
        misfire_policy TEXT NOT NULL DEFAULT 'fire_once',
        tags TEXT NOT NULL DEFAULT '[]',
        routing TEXT NOT NULL DEFAULT 'round_robin',
        run_once INTEGER NOT NULL DEFAULT 0,
        enabled INTEGER NOT NULL DEFAULT 1,
        allow_overlap INTEGER NOT NULL DEFAULT 0,
        `interval` TEXT NULL,
        next_trigger_ms INTEGER NULL,
        created_time REAL NOT NULL,
        updated_time REAL NOT NULL,
        last_finished_time REAL NULL,
        is_delete INTEGER NOT NULL DEFAULT 0,
        version INTEGER NOT NULL DEFAULT 1,
        stats TEXT NULL,
        UNIQUE (app, name))""",
    "CREATE INDEX IF NOT EXISTS ix_jobs_due ON jobs (app, enabled, is_delete, next_trigger_ms)",
    """CREATE TABLE IF NOT EXISTS instances (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL,
        app TEXT NOT NULL,
        planned_ms INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        status TEXT NOT NULL,
        trigger_kind TEXT NOT NULL,
        params TEXT NULL,
        server TEXT NULL,
        epoch INTEGER NOT NULL,
        worker TEXT NULL,
        created_at REAL NOT NULL,
        dispatched_at REAL NULL,
        started_at REAL NULL,
        finished_at REAL NULL,
        result TEXT NULL,
        error TEXT NULL,
        UNIQUE (job_id, planned_ms, attempt))""",
    "CREATE INDEX IF NOT EXISTS ix_instances_app_status ON instances (app, status)",
    """CREATE TABLE IF NOT EXISTS job_logs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        instance_id INTEGER NOT NULL,
        ts REAL NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ix_job_logs_instance ON job_logs (instance_id)",
]

# MySQL 8 has no CREATE INDEX IF NOT EXISTS, so indexes live inside CREATE TABLE.
_MYSQL_V1 = [
    """CREATE TABLE IF NOT EXISTS servers (
        id VARCHAR(191) NOT NULL PRIMARY KEY,
        address VARCHAR(255) NOT NULL,
        started_at DOUBLE NOT NULL,
        heartbeat_at DOUBLE NOT NULL)""" + _MYSQL_TAIL,
    """CREATE TABLE IF NOT EXISTS apps (
        name VARCHAR(191) NOT NULL PRIMARY KEY,
        owner VARCHAR(191) NULL,
        epoch BIGINT NOT NULL DEFAULT 0,
        token_hash VARCHAR(255) NULL,
        updated_at DOUBLE NOT NULL DEFAULT 0,
        KEY ix_apps_owner (owner))""" + _MYSQL_TAIL,
    """CREATE TABLE IF NOT EXISTS jobs (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        app VARCHAR(191) NOT NULL,
        name VARCHAR(191) NOT NULL,
        handler VARCHAR(255) NOT NULL,
        schedule_type VARCHAR(16) NOT NULL,
        schedule_expr VARCHAR(255) NOT NULL DEFAULT '',
        timezone VARCHAR(64) NOT NULL DEFAULT 'UTC',
        params MEDIUMTEXT NULL,
        timeout DOUBLE NULL,
        retry_times INT NOT NULL DEFAULT 0,
        retry_backoff DOUBLE NOT NULL DEFAULT 1,
        misfire_policy VARCHAR(32) NOT NULL DEFAULT 'fire_once',
        tags TEXT NOT NULL,
        routing VARCHAR(32) NOT NULL DEFAULT 'round_robin',
        run_once TINYINT NOT NULL DEFAULT 0,
        enabled TINYINT NOT NULL DEFAULT 1,
        allow_overlap TINYINT NOT NULL DEFAULT 0,
        `interval` VARCHAR(64) NULL,
        next_trigger_ms BIGINT NULL,
        created_time DOUBLE NOT NULL,
        updated_time DOUBLE NOT NULL,
        last_finished_time DOUBLE NULL,
        is_delete TINYINT NOT NULL DEFAULT 0,
        version BIGINT NOT NULL DEFAULT 1,
        stats MEDIUMTEXT NULL,
        UNIQUE KEY uq_jobs_app_name (app, name),
        KEY ix_jobs_due (app, enabled, is_delete, next_trigger_ms))""" + _MYSQL_TAIL,
    """CREATE TABLE IF NOT EXISTS instances (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        job_id BIGINT NOT NULL,
        app VARCHAR(191) NOT NULL,
        planned_ms BIGINT NOT NULL,
        attempt INT NOT NULL,
        status VARCHAR(16) NOT NULL,
        trigger_kind VARCHAR(16) NOT NULL,
        params MEDIUMTEXT NULL,
        server VARCHAR(191) NULL,
        epoch BIGINT NOT NULL,
        worker VARCHAR(191) NULL,
        created_at DOUBLE NOT NULL,
        dispatched_at DOUBLE NULL,
        started_at DOUBLE NULL,
        finished_at DOUBLE NULL,
        result MEDIUMTEXT NULL,
        error TEXT NULL,
        UNIQUE KEY uq_instances_fire (job_id, planned_ms, attempt),
        KEY ix_instances_app_status (app, status))""" + _MYSQL_TAIL,
    """CREATE TABLE IF NOT EXISTS job_logs (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        instance_id BIGINT NOT NULL,
        ts DOUBLE NOT NULL,
        level VARCHAR(16) NOT NULL,
        message MEDIUMTEXT NOT NULL,
        KEY ix_job_logs_instance (instance_id))""" + _MYSQL_TAIL,
]

# Version 2: overlap policies (the boolean allow_overlap maps true -> allow, false -> queue; the
# column stays, kept equal to overlap = 'allow', for readers of version 1), misfire catch-up,
# re-runs of interrupted attempts, how an app came to its owner, server load and drain
# requests, the worker registry, and the status 'skipped' for what was 'misfired' or
# 'cancelled: skipped: …'.
_V2_DATA = [
    "UPDATE jobs SET overlap = CASE WHEN allow_overlap = 1 THEN 'allow' ELSE 'queue' END",
    "UPDATE instances SET status = 'skipped' WHERE status = 'misfired'",
    "UPDATE instances SET status = 'skipped' WHERE status = 'cancelled' AND error LIKE 'skipped:%'",
]
_SQLITE_V2 = [
    "ALTER TABLE jobs ADD COLUMN overlap TEXT NOT NULL DEFAULT 'queue'",
    "ALTER TABLE jobs ADD COLUMN catch_up_window REAL NOT NULL DEFAULT 3600",
    "ALTER TABLE jobs ADD COLUMN max_queued INTEGER NOT NULL DEFAULT 100",
    "ALTER TABLE instances ADD COLUMN reruns INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE apps ADD COLUMN prev_owner TEXT NULL",
    "ALTER TABLE apps ADD COLUMN left_clean INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE apps ADD COLUMN adopted INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE servers ADD COLUMN load_score REAL NOT NULL DEFAULT 0",
    "ALTER TABLE servers ADD COLUMN drain INTEGER NOT NULL DEFAULT 0",
    """CREATE TABLE IF NOT EXISTS workers (
        app TEXT NOT NULL,
        worker_id TEXT NOT NULL,
        server TEXT NOT NULL,
        connected_at REAL NOT NULL,
        info TEXT NULL,
        PRIMARY KEY (app, worker_id))""",
    *_V2_DATA,
]
# Each MySQL statement may run twice when two servers migrate at once (DDL commits on its own):
# the driver tolerates "duplicate column" (1060) for them (see MYSQL_TOLERATED).
_MYSQL_V2 = [
    "ALTER TABLE jobs ADD COLUMN overlap VARCHAR(16) NOT NULL DEFAULT 'queue'",
    "ALTER TABLE jobs ADD COLUMN catch_up_window DOUBLE NOT NULL DEFAULT 3600",
    "ALTER TABLE jobs ADD COLUMN max_queued INT NOT NULL DEFAULT 100",
    "ALTER TABLE instances ADD COLUMN reruns INT NOT NULL DEFAULT 0",
    "ALTER TABLE apps ADD COLUMN prev_owner VARCHAR(191) NULL",
    "ALTER TABLE apps ADD COLUMN left_clean TINYINT NOT NULL DEFAULT 0",
    "ALTER TABLE apps ADD COLUMN adopted TINYINT NOT NULL DEFAULT 1",
    "ALTER TABLE servers ADD COLUMN load_score DOUBLE NOT NULL DEFAULT 0",
    "ALTER TABLE servers ADD COLUMN drain TINYINT NOT NULL DEFAULT 0",
    """CREATE TABLE IF NOT EXISTS workers (
        app VARCHAR(191) NOT NULL,
        worker_id VARCHAR(191) NOT NULL,
        server VARCHAR(191) NOT NULL,
        connected_at DOUBLE NOT NULL,
        info TEXT NULL,
        PRIMARY KEY (app, worker_id))""" + _MYSQL_TAIL,
    *_V2_DATA,
]
# Version 3: which database sessions belong to which server, so that a survivor can end the
# sessions of a server it judged dead (a frozen process's open transaction keeps its row locks
# until its connection ends). SQLite has nothing to record: its lock lives in the file.
_MYSQL_V3 = [
    """CREATE TABLE IF NOT EXISTS db_sessions (
        conn_id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
        server_id VARCHAR(191) NOT NULL,
        opened_at DOUBLE NOT NULL,
        KEY ix_db_sessions_server (server_id))""" + _MYSQL_TAIL,
]
_SQLITE_V3: list[str] = []
# Version 4: who defines a job and why it is paused (declared jobs are reconciled: see
# server/reconcile.py). A job paused before version 4 keeps paused_by NULL, which counts as an
# operator's pause: a re-declaration never resumes it. spec_digest (codecs.spec_digest) lets an
# unchanged re-declaration skip reading the definition; NULL (older rows) means "compare it".
# anchor_ms: when the current schedule took effect (a second-level job's grid starts there);
# older jobs take their last change.
# job_runs: the run history of second-level jobs (models.JobRun).
_SQLITE_V4 = [
    "ALTER TABLE jobs ADD COLUMN origin TEXT NOT NULL DEFAULT 'api'",
    "ALTER TABLE jobs ADD COLUMN paused_by TEXT NULL",
    "ALTER TABLE jobs ADD COLUMN spec_digest TEXT NULL",
    "ALTER TABLE jobs ADD COLUMN anchor_ms INTEGER NULL",
    "UPDATE jobs SET anchor_ms = CAST(updated_time * 1000 AS INTEGER) WHERE anchor_ms IS NULL",
    """CREATE TABLE IF NOT EXISTS job_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL,
        app TEXT NOT NULL,
        worker TEXT NOT NULL,
        planned_at REAL NOT NULL,
        started_at REAL NOT NULL,
        duration REAL NOT NULL,
        status TEXT NOT NULL,
        error TEXT NULL,
        logs TEXT NULL)""",
    "CREATE INDEX IF NOT EXISTS ix_job_runs_job ON job_runs (job_id, id)",
]
_MYSQL_V4 = [
    "ALTER TABLE jobs ADD COLUMN origin VARCHAR(16) NOT NULL DEFAULT 'api'",
    "ALTER TABLE jobs ADD COLUMN paused_by VARCHAR(16) NULL",
    "ALTER TABLE jobs ADD COLUMN spec_digest CHAR(24) NULL",
    "ALTER TABLE jobs ADD COLUMN anchor_ms BIGINT NULL",
    "UPDATE jobs SET anchor_ms = CAST(updated_time * 1000 AS SIGNED) WHERE anchor_ms IS NULL",
    """CREATE TABLE IF NOT EXISTS job_runs (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        job_id BIGINT NOT NULL,
        app VARCHAR(191) NOT NULL,
        worker VARCHAR(191) NOT NULL,
        planned_at DOUBLE NOT NULL,
        started_at DOUBLE NOT NULL,
        duration DOUBLE NOT NULL,
        status VARCHAR(16) NOT NULL,
        error TEXT NULL,
        logs MEDIUMTEXT NULL,
        KEY ix_job_runs_job (job_id, id))""" + _MYSQL_TAIL,
]

# Version 5: the admin API's tables. Tokens (stored as salted hashes, see server/auth.py), the
# audit log, the history of ownership changes, trigger idempotency keys, each server's HTTP
# address (requests are forwarded to an app's owner there), and an index by planned time for
# the instance lists, cursors and stats.
_SQLITE_V5 = [
    "ALTER TABLE servers ADD COLUMN http_address TEXT NOT NULL DEFAULT ''",
    """CREATE TABLE IF NOT EXISTS api_tokens (
        id TEXT NOT NULL PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        apps TEXT NULL,
        salt TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NULL,
        revoked_at REAL NULL)""",
    """CREATE TABLE IF NOT EXISTS audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        app TEXT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NULL,
        via TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ix_audit_app ON audit_log (app, id)",
    """CREATE TABLE IF NOT EXISTS app_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        app TEXT NOT NULL,
        from_server TEXT NULL,
        to_server TEXT NULL,
        epoch INTEGER NOT NULL,
        reason TEXT NOT NULL,
        ts REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ix_app_history_app ON app_history (app, id)",
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        app TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        instance_id INTEGER NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (app, idem_key))""",
    "CREATE INDEX IF NOT EXISTS ix_instances_app_planned ON instances (app, planned_ms)",
]
_MYSQL_V5 = [
    "ALTER TABLE servers ADD COLUMN http_address VARCHAR(255) NOT NULL DEFAULT ''",
    """CREATE TABLE IF NOT EXISTS api_tokens (
        id VARCHAR(64) NOT NULL PRIMARY KEY,
        name VARCHAR(191) NOT NULL,
        role VARCHAR(16) NOT NULL,
        apps TEXT NULL,
        salt VARCHAR(64) NOT NULL,
        secret_hash VARCHAR(128) NOT NULL,
        created_at DOUBLE NOT NULL,
        expires_at DOUBLE NULL,
        revoked_at DOUBLE NULL)""" + _MYSQL_TAIL,
    """CREATE TABLE IF NOT EXISTS audit_log (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        ts DOUBLE NOT NULL,
        actor VARCHAR(191) NOT NULL,
        action VARCHAR(64) NOT NULL,
        app VARCHAR(191) NULL,
        target VARCHAR(255) NOT NULL,
        outcome VARCHAR(64) NOT NULL,
        detail TEXT NULL,
        via VARCHAR(8) NOT NULL,
        KEY ix_audit_app (app, id))""" + _MYSQL_TAIL,
    """CREATE TABLE IF NOT EXISTS app_history (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        app VARCHAR(191) NOT NULL,
        from_server VARCHAR(191) NULL,
        to_server VARCHAR(191) NULL,
        epoch BIGINT NOT NULL,
        reason VARCHAR(255) NOT NULL,
        ts DOUBLE NOT NULL,
        KEY ix_app_history_app (app, id))""" + _MYSQL_TAIL,
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        app VARCHAR(191) NOT NULL,
        idem_key VARCHAR(191) NOT NULL,
        instance_id BIGINT NULL,
        created_at DOUBLE NOT NULL,
        PRIMARY KEY (app, idem_key))""" + _MYSQL_TAIL,
    "CREATE INDEX ix_instances_app_planned ON instances (app, planned_ms)",
]

# Version 6: alarms. A job's alarm settings, and the outbox: an alarm is written with the status
# that raised it (same transaction), one row per webhook, and delivered from there at least once
# (exactly once unless a sender dies between delivering and recording it): server/alarms.py.
_SQLITE_V6 = [
    "ALTER TABLE jobs ADD COLUMN alarm TEXT NULL",
    """CREATE TABLE IF NOT EXISTS alarm_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL,
        webhook TEXT NOT NULL,
        app TEXT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        claimed_by TEXT NULL,
        claimed_until REAL NULL,
        delivered_at REAL NULL,
        last_error TEXT NULL,
        UNIQUE (event_id, webhook))""",
    "CREATE INDEX IF NOT EXISTS ix_alarm_outbox_due ON alarm_outbox (delivered_at, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS ix_idempotency_created ON idempotency_keys (created_at)",
]
_MYSQL_V6 = [
    "ALTER TABLE jobs ADD COLUMN alarm TEXT NULL",
    """CREATE TABLE IF NOT EXISTS alarm_outbox (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        event_id VARCHAR(191) NOT NULL,
        webhook VARCHAR(64) NOT NULL,
        app VARCHAR(191) NULL,
        payload MEDIUMTEXT NOT NULL,
        created_at DOUBLE NOT NULL,
        next_attempt_at DOUBLE NOT NULL,
        attempts INT NOT NULL DEFAULT 0,
        claimed_by VARCHAR(191) NULL,
        claimed_until DOUBLE NULL,
        delivered_at DOUBLE NULL,
        last_error TEXT NULL,
        UNIQUE KEY uq_alarm_outbox_event (event_id, webhook),
        KEY ix_alarm_outbox_due (delivered_at, next_attempt_at))""" + _MYSQL_TAIL,
    "CREATE INDEX ix_idempotency_created ON idempotency_keys (created_at)",
]

# Version 7: how a job's fire runs (models.MODES: one worker, or a broadcast to every connected
# worker, of which min_success must succeed), and the sub-task batches (models.TaskBatch) of
# ctx.map calls, broadcast sub-runs and workflow steps, written before they run and kept with
# their results (their key is unique, so a resubmitted batch finds the stored one).
_SQLITE_V7 = [
    "ALTER TABLE jobs ADD COLUMN mode TEXT NOT NULL DEFAULT 'single'",
    "ALTER TABLE jobs ADD COLUMN min_success REAL NOT NULL DEFAULT 1",
    """CREATE TABLE IF NOT EXISTS task_batches (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        batch_key TEXT NOT NULL UNIQUE,
        app TEXT NOT NULL,
        root TEXT NOT NULL,
        parent TEXT NOT NULL,
        call_no INTEGER NOT NULL,
        start_index INTEGER NOT NULL,
        size INTEGER NOT NULL,
        handler TEXT NOT NULL,
        items TEXT NOT NULL,
        status TEXT NOT NULL,
        parent_attempt INTEGER NOT NULL DEFAULT 1,
        attempt INTEGER NOT NULL DEFAULT 0,
        worker TEXT NULL,
        results TEXT NULL,
        errors TEXT NULL,
        failed INTEGER NOT NULL DEFAULT 0,
        extra TEXT NULL,
        logs TEXT NULL,
        created_at REAL NOT NULL,
        finished_at REAL NULL)""",
    "CREATE INDEX IF NOT EXISTS ix_task_batches_root ON task_batches (root, id)",
]
_MYSQL_V7 = [
    "ALTER TABLE jobs ADD COLUMN mode VARCHAR(16) NOT NULL DEFAULT 'single'",
    "ALTER TABLE jobs ADD COLUMN min_success DOUBLE NOT NULL DEFAULT 1",
    """CREATE TABLE IF NOT EXISTS task_batches (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        batch_key VARCHAR(255) NOT NULL,
        app VARCHAR(191) NOT NULL,
        root VARCHAR(191) NOT NULL,
        parent VARCHAR(191) NOT NULL,
        call_no INT NOT NULL,
        start_index INT NOT NULL,
        size INT NOT NULL,
        handler VARCHAR(191) NOT NULL,
        items MEDIUMTEXT NOT NULL,
        status VARCHAR(16) NOT NULL,
        parent_attempt INT NOT NULL DEFAULT 1,
        attempt INT NOT NULL DEFAULT 0,
        worker VARCHAR(191) NULL,
        results MEDIUMTEXT NULL,
        errors MEDIUMTEXT NULL,
        failed INT NOT NULL DEFAULT 0,
        extra MEDIUMTEXT NULL,
        logs MEDIUMTEXT NULL,
        created_at DOUBLE NOT NULL,
        finished_at DOUBLE NULL,
        UNIQUE KEY uq_task_batches_key (batch_key),
        KEY ix_task_batches_root (root, id))""" + _MYSQL_TAIL,
]

#: MySQL error codes a migration statement may meet when another server ran it first.
MYSQL_TOLERATED = (1060, 1061)  # duplicate column name, duplicate key name

MIGRATIONS: dict[str, list[list[str]]] = {
    "sqlite": [_SQLITE_V1, _SQLITE_V2, _SQLITE_V3, _SQLITE_V4, _SQLITE_V5, _SQLITE_V6, _SQLITE_V7],
    "mysql": [_MYSQL_V1, _MYSQL_V2, _MYSQL_V3, _MYSQL_V4, _MYSQL_V5, _MYSQL_V6, _MYSQL_V7],
}

LATEST_VERSION = len(MIGRATIONS["sqlite"])
assert all(len(steps) == LATEST_VERSION for steps in MIGRATIONS.values())
