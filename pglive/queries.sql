-- The SQL that pglive's Python code sends. Each block starts with `-- name: NAME`, then one
-- line saying what it does; parameters are %(named)s. Almost every query calls one function of
-- the SQL API (sql/0002_functions.sql), where the decisions are made.

-- name: register_terminal
-- Register a new instance; returns its id and secret token.
SELECT instance_id, token
FROM pglive.register_terminal(%(terminal_type)s, %(machine_id)s::uuid, %(environment)s,
                              %(pid)s::int, %(hostname)s, %(heartbeat_interval)s::numeric,
                              %(log_file_path)s)

-- name: heartbeat
-- Report liveness and counter deltas; returns the status.
SELECT pglive.heartbeat(%(instance_id)s::uuid, %(token)s, %(commands)s::bigint,
                        %(errors)s::bigint, %(last_error)s, %(sequence)s::bigint) AS status

-- name: begin_terminal_stop
-- Start a graceful stop (status stopping).
SELECT pglive.begin_terminal_stop(%(instance_id)s::uuid, %(token)s, %(reason)s) AS status

-- name: finish_terminal_stop
-- Flush the final counters and mark the instance stopped.
SELECT pglive.finish_terminal_stop(%(instance_id)s::uuid, %(token)s, %(commands)s::bigint,
                                   %(errors)s::bigint, %(last_error)s, %(sequence)s::bigint,
                                   %(reason)s) AS status

-- name: mark_terminal_crashed
-- Mark an instance crashed; returns crashed or already_<status>.
SELECT pglive.mark_terminal_crashed(%(instance_id)s::uuid, %(reason)s) AS outcome

-- name: sweep
-- Run one sweep now; returns what changed.
SELECT instance_id, machine_id, terminal_type, action, detail
FROM pglive.sweep(NULL, %(machine_id)s::uuid)

-- name: terminal_status
-- The newest instance of every slot, optionally of one machine.
SELECT *
FROM pglive.terminal_status
WHERE %(machine_id)s::uuid IS NULL OR machine_id = %(machine_id)s::uuid
ORDER BY machine_id, terminal_type

-- name: instance_history
-- The status changes of one instance, oldest first.
SELECT h.created_at, h.previous_status, h.new_status, h.reason, h.uptime_seconds
FROM pglive.terminal_health_history h
WHERE h.terminal_instance_id = %(instance_id)s::uuid
ORDER BY h.id

-- name: instance_exists
-- Whether an instance id is known.
SELECT EXISTS (SELECT FROM pglive.terminal_instances WHERE id = %(instance_id)s::uuid)

-- name: applied_migrations
-- Names of the migrations already applied.
SELECT name FROM pglive.schema_migration

-- name: record_migration
-- Record one applied migration.
INSERT INTO pglive.schema_migration (name) VALUES (%(name)s) ON CONFLICT (name) DO NOTHING

-- name: migration_lock
-- Serialize concurrent migrators for the rest of the transaction.
SELECT pg_advisory_xact_lock(hashtext('pglive.migrate'))

-- name: migration_table_exists
-- Whether pglive was ever migrated here.
SELECT to_regclass('pglive.schema_migration') IS NOT NULL

-- name: cli_instance
-- One instance by id, for the heading of `pglive history`.
SELECT id, machine_id, terminal_type, status, pid, hostname, started_at
FROM pglive.terminal_instances
WHERE id = %(instance_id)s::uuid

-- name: cli_launchers
-- The newest launcher of one machine, or of every machine when machine_id is NULL.
SELECT *
FROM pglive.launchers
WHERE %(machine_id)s::uuid IS NULL OR machine_id = %(machine_id)s::uuid
ORDER BY machine_id

-- name: cli_recovery_decision
-- What a launcher would do about a slot now; raises for an unknown terminal type.
SELECT action, attempt, max_attempts, reason
FROM pglive.recovery_decision(%(machine_id)s::uuid, %(terminal_type)s)

-- name: cli_reset_recovery
-- Forget the restart attempts and any give-up of a slot.
SELECT pglive.reset_recovery(%(machine_id)s::uuid, %(terminal_type)s)
