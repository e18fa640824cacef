-- pglive 0004: privileges of the group roles, and the pg_cron schedule of the sweep.

-- No role but the owner touches the tables; the API functions are the only way in.
REVOKE ALL ON ALL TABLES IN SCHEMA pglive FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pglive FROM PUBLIC;
REVOKE EXECUTE ON ALL PROCEDURES IN SCHEMA pglive FROM PUBLIC;

GRANT USAGE ON SCHEMA pglive TO pglive_terminal, pglive_launcher, pglive_operator;

-- Helpers that the views call run with the caller's rights, so every role may call them.
GRANT EXECUTE ON FUNCTION
    pglive._active_statuses(),
    pglive._setting(text, uuid),
    pglive._uptime_seconds(pglive.terminal_instances, timestamptz),
    pglive.machine_channel(uuid)
TO pglive_terminal, pglive_launcher, pglive_operator;

-- A terminal may register, heartbeat, claim work and stop its own instance (the token proves it).
GRANT EXECUTE ON FUNCTION
    pglive.register_terminal(text, uuid, text, integer, text, numeric, text),
    pglive.heartbeat(uuid, text, bigint, bigint, text, bigint),
    pglive.lock_active_instance(uuid, text),
    pglive.begin_terminal_stop(uuid, text, text),
    pglive.finish_terminal_stop(uuid, text, bigint, bigint, text, bigint, text)
TO pglive_terminal;

-- A launcher is a terminal itself (it registers as type 'launcher') and reports on the others.
GRANT pglive_terminal TO pglive_launcher;

GRANT EXECUTE ON FUNCTION
    pglive.report_process_exit(uuid, text, integer, text, timestamptz, integer, integer, text),
    pglive.mark_terminal_crashed(uuid, text),
    pglive.recovery_decision(uuid, text, timestamptz),
    pglive.reset_recovery(uuid, text),
    pglive.set_machine_setting(uuid, text, numeric),
    pglive.detect_dead_terminals(numeric, timestamptz, uuid),
    pglive.get_terminal_uptime(uuid, timestamptz),
    pglive.sweep(timestamptz, uuid)
TO pglive_launcher;

-- An operator reads: the views, and the tables without the token hashes.
GRANT EXECUTE ON FUNCTION
    pglive.detect_dead_terminals(numeric, timestamptz, uuid),
    pglive.get_terminal_uptime(uuid, timestamptz)
TO pglive_operator;

-- A launcher checks its config's terminal types against the control plane's.
GRANT SELECT ON pglive.terminal_types TO pglive_launcher;

GRANT SELECT ON
    pglive.active_terminals,
    pglive.terminal_status,
    pglive.terminal_health_summary,
    pglive.recovery_give_ups,
    pglive.launchers,
    pglive.machines_without_launcher
TO pglive_launcher, pglive_operator;

GRANT SELECT ON
    pglive.terminal_health_history,
    pglive.terminal_types,
    pglive.settings,
    pglive.machine_settings,
    pglive.recovery_state,
    pglive.recovery_events
TO pglive_operator;

GRANT SELECT (id, terminal_type, machine_id, environment, status, status_reason, pid, hostname,
              heartbeat_interval, last_heartbeat, missed_heartbeats, commands_processed,
              errors_encountered, last_error, log_file_path, replaces_instance_id, started_at,
              stopped_at, crash_detected_at, created_at)
    ON pglive.terminal_instances TO pglive_operator;

-- The sweep, scheduled by pg_cron where it can be. pg_cron lives in one database per cluster
-- (cron.database_name); elsewhere this step says how to sweep instead and succeeds anyway.
DO $$
DECLARE
    v_cron_database text := current_setting('cron.database_name', true);
    v_preloaded     boolean := current_setting('shared_preload_libraries') ~ '(^|[ ,])pg_cron($|[ ,])';
    v_version       text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_available_extensions WHERE name = 'pg_cron')
       OR NOT v_preloaded THEN
        RAISE NOTICE 'pg_cron is not available here, so nothing sweeps on its own. Sweep every few '
                     'seconds from elsewhere: psql -c "CALL pglive.run_sweeper()" once a minute, or '
                     '"SELECT * FROM pglive.sweep()" in a loop. To use pg_cron, install it (Debian: '
                     'postgresql-NN-cron), add pg_cron to shared_preload_libraries, restart and '
                     'migrate again.';
        RETURN;
    END IF;

    IF v_cron_database IS DISTINCT FROM current_database() THEN
        RAISE NOTICE 'pg_cron runs in database "%", not "%": schedule the sweep from there with '
                     'SELECT cron.schedule_in_database(''pglive-sweep'', ''* * * * *'', '
                     '''CALL pglive.run_sweeper()'', %L)',
                     coalesce(v_cron_database, 'postgres'), current_database(), current_database();
        RETURN;
    END IF;

    CREATE EXTENSION IF NOT EXISTS pg_cron;
    SELECT extversion INTO v_version FROM pg_catalog.pg_extension WHERE extname = 'pg_cron';

    -- Scheduling by name replaces an existing job of that name, so re-applying is harmless.
    IF string_to_array(split_part(v_version, '-', 1), '.')::int[] >= ARRAY[1, 5] THEN
        PERFORM cron.schedule('pglive-sweep',
                              pglive._setting('sweep_interval_seconds')::int || ' seconds',
                              'SELECT count(*) FROM pglive.sweep()');
    ELSE
        PERFORM cron.schedule('pglive-sweep', '* * * * *', 'CALL pglive.run_sweeper()');
    END IF;

    -- pg_cron never trims its run history by itself.
    PERFORM cron.schedule('pglive-prune-cron-history', '17 3 * * *',
                          $job$DELETE FROM cron.job_run_details WHERE end_time < now() - interval '7 days'$job$);
END
$$;

INSERT INTO pglive.schema_migration (name) VALUES ('0004_grants_and_cron') ON CONFLICT (name) DO NOTHING;
