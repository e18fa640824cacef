-- The SQL that the launcher sends. Each block starts with `-- name: NAME`, then one line
-- saying what it does. The decisions are made by the functions it calls.

-- name: server_now
-- The server's clock, taken just before a terminal is spawned.
SELECT clock_timestamp() AS now

-- name: terminal_types
-- The terminal types the control plane knows.
SELECT terminal_type, supervised FROM pglive.terminal_types ORDER BY terminal_type

-- name: set_machine_setting
-- Override one setting for this machine (heartbeat timeout, restart delay).
SELECT pglive.set_machine_setting(%(machine_id)s::uuid, %(key)s, %(value)s::numeric)

-- name: newest_instance
-- The newest instance of one slot, active or not.
SELECT instance_id, status, status_reason, pid, hostname, started_at
FROM pglive.terminal_status
WHERE machine_id = %(machine_id)s::uuid AND terminal_type = %(terminal_type)s

-- name: active_instance
-- The active instance of one slot, if any.
SELECT instance_id, status, pid, hostname, started_at
FROM pglive.active_terminals
WHERE machine_id = %(machine_id)s::uuid AND terminal_type = %(terminal_type)s

-- name: recovery_decision
-- What to do about one slot: running, start, restart (after a delay) or gave_up.
SELECT action, attempt, max_attempts, delay_seconds, restart_at, reason
FROM pglive.recovery_decision(%(machine_id)s::uuid, %(terminal_type)s)

-- name: report_process_exit
-- Tell the control plane that a terminal process has exited.
SELECT instance_id, outcome
FROM pglive.report_process_exit(%(machine_id)s::uuid, %(terminal_type)s, %(pid)s::int,
                                %(hostname)s, %(spawned_at)s::timestamptz,
                                %(exit_code)s::int, %(signal)s::int, %(detail)s)

-- name: mark_terminal_crashed
-- Mark an instance crashed (a launcher whose process is gone).
SELECT pglive.mark_terminal_crashed(%(instance_id)s::uuid, %(reason)s) AS outcome

-- name: heartbeat_timeout
-- The heartbeat timeout in force for this machine.
SELECT pglive._setting('heartbeat_timeout_seconds', %(machine_id)s::uuid) AS timeout
