-- pglive 0003: views for operators (psql, `pglive status`) and for launchers.
--
-- "Operations" are commands plus errors; the error rate is errors / operations, the same
-- measure the sweep uses for degraded.

CREATE OR REPLACE VIEW pglive.active_terminals AS
SELECT ti.id AS instance_id,
       ti.machine_id,
       ti.terminal_type,
       ti.status,
       ti.pid,
       ti.hostname,
       ti.environment,
       ti.started_at,
       ti.last_heartbeat,
       round(extract(epoch FROM now() - ti.started_at)::numeric, 1) AS uptime_seconds,
       round(extract(epoch FROM now() - coalesce(ti.last_heartbeat, ti.started_at))::numeric, 1)
           AS seconds_since_heartbeat,
       ti.heartbeat_interval,
       ti.missed_heartbeats,
       ti.commands_processed,
       ti.errors_encountered,
       ti.last_error,
       ti.log_file_path
FROM pglive.terminal_instances ti
WHERE ti.status IN ('starting', 'healthy', 'degraded', 'stopping');

COMMENT ON VIEW pglive.active_terminals IS
    'Instances that are starting, healthy, degraded or stopping, with uptime and seconds since '
    'their last heartbeat.';

-- The newest instance of every (machine, terminal type) slot, as `pglive status` shows it.
CREATE OR REPLACE VIEW pglive.terminal_status AS
SELECT latest.id AS instance_id,
       latest.machine_id,
       latest.terminal_type,
       latest.status,
       latest.status_reason,
       latest.pid,
       latest.hostname,
       latest.environment,
       latest.started_at,
       latest.last_heartbeat,
       round(pglive._uptime_seconds(latest), 1) AS uptime_seconds,
       CASE WHEN latest.status IN ('starting', 'healthy', 'degraded', 'stopping') THEN
           round(extract(epoch FROM now() - coalesce(latest.last_heartbeat, latest.started_at))::numeric, 1)
       END AS seconds_since_heartbeat,
       latest.commands_processed,
       latest.errors_encountered,
       latest.last_error,
       (SELECT count(*)
        FROM pglive.terminal_instances r
        WHERE r.machine_id = latest.machine_id
          AND r.terminal_type = latest.terminal_type
          AND r.replaces_instance_id IS NOT NULL
          AND r.started_at > now() - interval '24 hours') AS restarts_24h,
       rs.attempts AS restart_attempts,
       rs.gave_up_at
FROM (
    SELECT DISTINCT ON (ti.machine_id, ti.terminal_type) ti.*
    FROM pglive.terminal_instances ti
    ORDER BY ti.machine_id, ti.terminal_type, ti.started_at DESC
) latest
LEFT JOIN pglive.recovery_state rs
       ON rs.machine_id = latest.machine_id AND rs.terminal_type = latest.terminal_type;

COMMENT ON VIEW pglive.terminal_status IS
    'The newest instance of each (machine, terminal type), with restarts over 24 hours and any '
    'give-up.';

CREATE OR REPLACE VIEW pglive.terminal_health_summary AS
SELECT ti.machine_id,
       ti.terminal_type,
       count(*) AS instances,
       count(*) FILTER (WHERE ti.status = 'crashed') AS crashes,
       count(*) FILTER (WHERE ti.replaces_instance_id IS NOT NULL) AS restarts,
       sum(ti.commands_processed) AS commands,
       sum(ti.errors_encountered) AS errors,
       round(100.0 * sum(ti.errors_encountered)
             / nullif(sum(ti.commands_processed + ti.errors_encountered), 0), 2) AS error_rate_pct,
       round(avg(pglive._uptime_seconds(ti)), 1) AS avg_uptime_seconds
FROM pglive.terminal_instances ti
WHERE ti.started_at > now() - interval '24 hours'
   OR ti.status IN ('starting', 'healthy', 'degraded', 'stopping')
GROUP BY ti.machine_id, ti.terminal_type;

COMMENT ON VIEW pglive.terminal_health_summary IS
    'Per machine and terminal type over the last 24 hours (plus anything still active): '
    'instances, crashes, restarts, commands, errors, error rate % and average uptime.';

CREATE OR REPLACE VIEW pglive.recovery_give_ups AS
SELECT re.machine_id,
       re.terminal_type,
       re.created_at AS gave_up_at,
       re.attempt AS attempts,
       re.instance_id AS last_instance_id,
       re.reason,
       rs.gave_up_at IS NOT NULL AND rs.gave_up_at = re.created_at AS still_given_up
FROM pglive.recovery_events re
LEFT JOIN pglive.recovery_state rs
       ON rs.machine_id = re.machine_id AND rs.terminal_type = re.terminal_type
WHERE re.event = 'gave_up';

COMMENT ON VIEW pglive.recovery_give_ups IS
    'Every time a launcher gave up restarting a terminal. still_given_up is true until '
    'pglive.reset_recovery() clears it.';

-- The launcher of each machine that has ever had one, and whether it is alive.
CREATE OR REPLACE VIEW pglive.launchers AS
SELECT latest.machine_id,
       latest.id AS instance_id,
       latest.status,
       latest.status_reason,
       latest.pid,
       latest.hostname,
       latest.started_at,
       latest.last_heartbeat,
       latest.status IN ('starting', 'healthy', 'degraded', 'stopping') AS alive
FROM (
    SELECT DISTINCT ON (ti.machine_id) ti.*
    FROM pglive.terminal_instances ti
    WHERE ti.terminal_type = 'launcher'
    ORDER BY ti.machine_id, ti.started_at DESC
) latest;

COMMENT ON VIEW pglive.launchers IS 'The newest launcher instance of every machine.';

CREATE OR REPLACE VIEW pglive.machines_without_launcher AS
SELECT at.machine_id,
       count(*) AS active_terminals,
       max(at.last_heartbeat) AS last_terminal_heartbeat,
       l.status AS launcher_status,
       l.status_reason AS launcher_status_reason
FROM pglive.active_terminals at
LEFT JOIN pglive.launchers l ON l.machine_id = at.machine_id
WHERE at.terminal_type <> 'launcher'
  AND coalesce(l.alive, false) = false
GROUP BY at.machine_id, l.status, l.status_reason;

COMMENT ON VIEW pglive.machines_without_launcher IS
    'Machines with active terminals but no live launcher: nothing will restart them.';

INSERT INTO pglive.schema_migration (name) VALUES ('0003_views') ON CONFLICT (name) DO NOTHING;
