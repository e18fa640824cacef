-- pglive 0001: schema, roles, tables and indexes of the liveness control plane.
--
-- Every migration file is idempotent: applying it twice changes nothing, so
-- `psql -1 -v ON_ERROR_STOP=1 -f sql/NNNN_*.sql` in order gives what `pglive migrate` gives.
-- Each file records itself in pglive.schema_migration as its last statement.

CREATE SCHEMA IF NOT EXISTS pglive;

COMMENT ON SCHEMA pglive IS 'pglive: liveness of long-running terminals (registry, heartbeats, crashes, recovery)';

CREATE TABLE IF NOT EXISTS pglive.schema_migration (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Group roles (NOLOGIN): grant them to the login roles of terminals, launchers and operators.
-- Roles are cluster-wide, so another database of the same cluster may have created them already.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pglive_terminal') THEN
        CREATE ROLE pglive_terminal NOLOGIN;
    END IF;

    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pglive_launcher') THEN
        CREATE ROLE pglive_launcher NOLOGIN;
    END IF;

    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pglive_operator') THEN
        CREATE ROLE pglive_operator NOLOGIN;
    END IF;
END
$$;

-- The kinds of process pglive supervises. `supervised = false` marks the launcher itself: it is
-- registered and swept like a terminal (so a machine without a live launcher shows), but no
-- launcher restarts it.
CREATE TABLE IF NOT EXISTS pglive.terminal_types (
    terminal_type text PRIMARY KEY
        CONSTRAINT terminal_types_name_format CHECK (terminal_type ~ '^[a-z][a-z0-9_-]{0,62}$'),
    description   text NOT NULL,
    supervised    boolean NOT NULL DEFAULT true
);

INSERT INTO pglive.terminal_types (terminal_type, description, supervised)
VALUES
    ('terminal1', 'PLC data service: reads the PLC every second and stores readings', true),
    ('terminal2', 'recipe service: executes recipe steps on the PLC', true),
    ('terminal3', 'parameter service: writes parameters to the PLC', true),
    ('launcher', 'per-machine launcher that starts and restarts the terminals', false)
ON CONFLICT (terminal_type) DO NOTHING;

-- Tunables. A machine may override any of them in pglive.machine_settings (the launcher's
-- --heartbeat-timeout and --restart-delay do), except sweep_interval_seconds, which is global.
CREATE TABLE IF NOT EXISTS pglive.settings (
    key         text PRIMARY KEY,
    value       numeric NOT NULL,
    min_value   numeric NOT NULL,
    max_value   numeric NOT NULL,
    description text NOT NULL,
    CONSTRAINT settings_value_in_range CHECK (value BETWEEN min_value AND max_value)
);

INSERT INTO pglive.settings (key, value, min_value, max_value, description)
VALUES
    ('heartbeat_timeout_seconds', 30, 0.5, 86400,
     'an active instance with no heartbeat for this long is marked crashed by the sweep'),
    ('sweep_interval_seconds', 5, 1, 59,
     'how often the pg_cron job sweeps (global only)'),
    ('degraded_error_rate', 0.20, 0, 1,
     'a healthy instance whose errors reach this share of its operations in the window turns degraded'),
    ('recovered_error_rate', 0.10, 0, 1,
     'a degraded instance whose error share falls under this turns healthy again'),
    ('error_window_seconds', 300, 1, 86400,
     'the window over which the error rate is measured'),
    ('error_min_operations', 10, 1, 1000000,
     'fewer operations than this in the window never make an instance degraded'),
    ('restart_delay_seconds', 5, 0, 3600,
     'delay before restart attempt 1; attempts 2 and 3 wait 3 and 6 times as long'),
    ('max_restart_attempts', 3, 0, 100,
     'restart attempts after which the launcher gives up on a terminal'),
    ('stable_reset_seconds', 600, 1, 604800,
     'an instance that ran this long before it failed starts the attempt count afresh')
ON CONFLICT (key) DO NOTHING;

CREATE TABLE IF NOT EXISTS pglive.machine_settings (
    machine_id uuid NOT NULL,
    key        text NOT NULL
        CONSTRAINT machine_settings_key_fkey REFERENCES pglive.settings (key),
    value      numeric NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT machine_settings_pkey PRIMARY KEY (machine_id, key),
    CONSTRAINT machine_settings_not_global CHECK (key <> 'sweep_interval_seconds')
);

CREATE TABLE IF NOT EXISTS pglive.terminal_instances (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    terminal_type        text NOT NULL
        CONSTRAINT terminal_instances_terminal_type_fkey
        REFERENCES pglive.terminal_types (terminal_type),
    machine_id           uuid NOT NULL,
    environment          text NOT NULL
        CONSTRAINT terminal_instances_environment_known
        CHECK (environment IN ('production', 'development', 'testing')),
    status               text NOT NULL DEFAULT 'starting'
        CONSTRAINT terminal_instances_status_known
        CHECK (status IN ('starting', 'healthy', 'degraded', 'stopping', 'stopped', 'crashed')),
    status_reason        text,
    pid                  integer NOT NULL
        CONSTRAINT terminal_instances_pid_positive CHECK (pid > 0),
    hostname             text NOT NULL
        CONSTRAINT terminal_instances_hostname_not_empty CHECK (hostname <> ''),
    heartbeat_interval   numeric NOT NULL
        CONSTRAINT terminal_instances_heartbeat_interval_positive CHECK (heartbeat_interval > 0),
    last_heartbeat       timestamptz,
    missed_heartbeats    integer NOT NULL DEFAULT 0,
    commands_processed   bigint NOT NULL DEFAULT 0,
    errors_encountered   bigint NOT NULL DEFAULT 0,
    last_error           text,
    -- The highest heartbeat sequence applied: a retried heartbeat whose first try did commit
    -- carries the same sequence and adds nothing twice.
    last_beat_sequence   bigint NOT NULL DEFAULT 0,
    log_file_path        text,
    -- sha256 of the secret token handed out at registration; the token itself is never stored.
    token_hash           bytea NOT NULL,
    -- The instance of the same slot that crashed before this one started (a restart), if any.
    replaces_instance_id uuid
        CONSTRAINT terminal_instances_replaces_fkey REFERENCES pglive.terminal_instances (id),
    started_at           timestamptz NOT NULL DEFAULT now(),
    stopped_at           timestamptz,
    crash_detected_at    timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now()
);

-- One active instance per (machine, terminal type): the heart of duplicate prevention. Two
-- concurrent registrations of one slot serialize on this index and exactly one commits.
CREATE UNIQUE INDEX IF NOT EXISTS terminal_instances_one_active_per_slot
    ON pglive.terminal_instances (machine_id, terminal_type)
    WHERE status IN ('starting', 'healthy', 'degraded', 'stopping');

CREATE INDEX IF NOT EXISTS terminal_instances_slot_started
    ON pglive.terminal_instances (machine_id, terminal_type, started_at DESC);

CREATE INDEX IF NOT EXISTS terminal_instances_started
    ON pglive.terminal_instances (started_at);

CREATE TABLE IF NOT EXISTS pglive.terminal_health_history (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    terminal_instance_id uuid NOT NULL
        CONSTRAINT terminal_health_history_instance_fkey
        REFERENCES pglive.terminal_instances (id) ON DELETE CASCADE,
    previous_status      text,
    new_status           text NOT NULL,
    reason               text,
    uptime_seconds       numeric NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS terminal_health_history_instance
    ON pglive.terminal_health_history (terminal_instance_id, id);

CREATE INDEX IF NOT EXISTS terminal_health_history_created
    ON pglive.terminal_health_history (created_at);

-- What each heartbeat reported, for the error rate over a sliding window. Pruned by the sweep.
CREATE TABLE IF NOT EXISTS pglive.heartbeat_samples (
    terminal_instance_id uuid NOT NULL
        CONSTRAINT heartbeat_samples_instance_fkey
        REFERENCES pglive.terminal_instances (id) ON DELETE CASCADE,
    recorded_at          timestamptz NOT NULL,
    commands             bigint NOT NULL,
    errors               bigint NOT NULL
);

CREATE INDEX IF NOT EXISTS heartbeat_samples_instance_recorded
    ON pglive.heartbeat_samples (terminal_instance_id, recorded_at);

CREATE INDEX IF NOT EXISTS heartbeat_samples_recorded
    ON pglive.heartbeat_samples (recorded_at);

-- Restart bookkeeping per slot, decided here so that every launcher follows one policy.
CREATE TABLE IF NOT EXISTS pglive.recovery_state (
    machine_id              uuid NOT NULL,
    terminal_type           text NOT NULL
        CONSTRAINT recovery_state_terminal_type_fkey
        REFERENCES pglive.terminal_types (terminal_type),
    attempts                integer NOT NULL DEFAULT 0,
    last_failure_at         timestamptz,
    last_failure_reason     text,
    last_failed_instance_id uuid,
    -- Not before this time may the next instance start; NULL when no restart is pending.
    restart_at              timestamptz,
    gave_up_at              timestamptz,
    updated_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT recovery_state_pkey PRIMARY KEY (machine_id, terminal_type)
);

CREATE TABLE IF NOT EXISTS pglive.recovery_events (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    machine_id    uuid NOT NULL,
    terminal_type text NOT NULL,
    event         text NOT NULL
        CONSTRAINT recovery_events_event_known
        CHECK (event IN ('restart_scheduled', 'gave_up', 'reset')),
    attempt       integer NOT NULL,
    delay_seconds numeric,
    instance_id   uuid,
    reason        text,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS recovery_events_slot
    ON pglive.recovery_events (machine_id, terminal_type, id);

-- So that operators can type the unqualified names (active_terminals, sweep(), ...) in psql.
-- Takes effect for new sessions.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET search_path = "$user", public, pglive', current_database());
END
$$;

INSERT INTO pglive.schema_migration (name) VALUES ('0001_schema') ON CONFLICT (name) DO NOTHING;
