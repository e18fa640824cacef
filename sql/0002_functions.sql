-- pglive 0002: the SQL API. Every liveness decision is made here, on the server's clock.
--
-- Errors raised by this API carry a SQLSTATE a client can act on:
--   23505  a second active instance for a (machine, terminal type) slot
--   22023  an invalid argument (unknown terminal type, environment, setting, bad interval)
--   PL001  the instance is fenced: it is no longer active (crashed or stopped) and must exit
--   PL002  the token does not belong to the instance
--   PL003  no such instance
--   PL004  a status move the lifecycle does not allow
--
-- Functions that write take SECURITY DEFINER with a pinned search_path, so that the group roles
-- can call them without any right on the tables and a hostile search_path cannot redirect them.
-- Time-dependent functions take `p_now timestamptz DEFAULT NULL` so tests can move the clock.

-- ---------------------------------------------------------------------------------------------
-- Helpers
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pglive._active_statuses()
RETURNS text[]
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT ARRAY['starting', 'healthy', 'degraded', 'stopping']::text[]
$$;

CREATE OR REPLACE FUNCTION pglive.machine_channel(p_machine_id uuid)
RETURNS text
LANGUAGE sql
IMMUTABLE
STRICT
AS $$
    SELECT 'pglive_' || replace(p_machine_id::text, '-', '')
$$;

COMMENT ON FUNCTION pglive.machine_channel(uuid) IS
    'The LISTEN channel on which events of one machine are sent (a plain lowercase identifier).';

CREATE OR REPLACE FUNCTION pglive._token_hash(p_token text)
RETURNS bytea
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT pg_catalog.sha256(pg_catalog.convert_to(coalesce(p_token, ''), 'UTF8'))
$$;

CREATE OR REPLACE FUNCTION pglive._raise_unknown_instance(p_instance_id uuid)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'unknown terminal instance %', coalesce(p_instance_id::text, 'NULL')
        USING ERRCODE = 'PL003';
END
$$;

CREATE OR REPLACE FUNCTION pglive._raise_unknown_setting(p_key text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'unknown pglive setting "%"', coalesce(p_key, 'NULL')
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'SELECT key, value, description FROM pglive.settings lists them';
END
$$;

-- Raises 22023, listing the known types, unless p_terminal_type is one of them.
CREATE OR REPLACE FUNCTION pglive._check_terminal_type(p_terminal_type text)
RETURNS void
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pglive.terminal_types t WHERE t.terminal_type = p_terminal_type) THEN
        RAISE EXCEPTION 'unknown terminal type "%"', coalesce(p_terminal_type, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'known types: ' || (SELECT string_agg(t.terminal_type, ', ' ORDER BY 1)
                                             FROM pglive.terminal_types t);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pglive._setting(p_key text, p_machine_id uuid DEFAULT NULL)
RETURNS numeric
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
DECLARE
    v_value numeric;
BEGIN
    SELECT coalesce(ms.value, s.value)
    INTO v_value
    FROM pglive.settings s
    LEFT JOIN pglive.machine_settings ms ON ms.key = s.key AND ms.machine_id = p_machine_id
    WHERE s.key = p_key;

    IF v_value IS NULL THEN
        PERFORM pglive._raise_unknown_setting(p_key);
    END IF;

    RETURN v_value;
END
$$;

CREATE OR REPLACE FUNCTION pglive._signal_name(p_signal integer)
RETURNS text
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT CASE p_signal
        WHEN 1 THEN 'SIGHUP' WHEN 2 THEN 'SIGINT' WHEN 3 THEN 'SIGQUIT' WHEN 4 THEN 'SIGILL'
        WHEN 6 THEN 'SIGABRT' WHEN 7 THEN 'SIGBUS' WHEN 8 THEN 'SIGFPE' WHEN 9 THEN 'SIGKILL'
        WHEN 11 THEN 'SIGSEGV' WHEN 13 THEN 'SIGPIPE' WHEN 14 THEN 'SIGALRM'
        WHEN 15 THEN 'SIGTERM'
        ELSE 'signal ' || p_signal
    END
$$;

CREATE OR REPLACE FUNCTION pglive._uptime_seconds(p_instance pglive.terminal_instances,
                                                  p_now timestamptz DEFAULT NULL)
RETURNS numeric
LANGUAGE sql
STABLE
AS $$
    SELECT round(greatest(0, extract(epoch FROM
        coalesce(p_instance.stopped_at, p_instance.crash_detected_at, p_now, now())
        - p_instance.started_at))::numeric, 3)
$$;

-- Sends one event on the machine's channel. The payload always names the instance, so two
-- events of one transaction never collapse into one (NOTIFY drops identical payloads).
CREATE OR REPLACE FUNCTION pglive._notify(p_event text,
                                          p_machine_id uuid,
                                          p_terminal_type text,
                                          p_instance_id uuid,
                                          p_detail jsonb DEFAULT '{}')
RETURNS void
LANGUAGE sql
AS $$
    SELECT pg_catalog.pg_notify(
        pglive.machine_channel(p_machine_id),
        (jsonb_build_object(
            'event', p_event,
            'machine_id', p_machine_id,
            'terminal_type', p_terminal_type,
            'instance_id', p_instance_id,
            'at', now()
        ) || coalesce(p_detail, '{}'))::text
    )
$$;

-- Finds an instance by id and token and locks it; raises PL003 or PL002 when it cannot.
CREATE OR REPLACE FUNCTION pglive._authenticate(p_instance_id uuid, p_token text)
RETURNS pglive.terminal_instances
LANGUAGE plpgsql
AS $$
DECLARE
    v_instance pglive.terminal_instances;
BEGIN
    SELECT *
    INTO v_instance
    FROM pglive.terminal_instances
    WHERE id = p_instance_id
    FOR UPDATE;

    IF NOT FOUND THEN
        PERFORM pglive._raise_unknown_instance(p_instance_id);
    END IF;

    IF v_instance.token_hash <> pglive._token_hash(p_token) THEN
        RAISE EXCEPTION 'wrong token for terminal instance %', p_instance_id
            USING ERRCODE = 'PL002',
                  HINT = 'only the process that registered an instance may heartbeat or stop it';
    END IF;

    RETURN v_instance;
END
$$;

CREATE OR REPLACE FUNCTION pglive._raise_fenced(p_instance pglive.terminal_instances)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'terminal instance % (% on machine %) is %: it was replaced or stopped',
            p_instance.id, p_instance.terminal_type, p_instance.machine_id, p_instance.status
        USING ERRCODE = 'PL001',
              DETAIL = 'reason: ' || coalesce(p_instance.status_reason, 'none recorded'),
              HINT = 'this process must stop acting and exit; a new instance takes over';
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Status lifecycle (triggers)
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pglive._transition_allowed(p_from text, p_to text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT (p_from, p_to) IN (
        ('starting', 'healthy'),
        ('starting', 'stopping'),
        ('starting', 'crashed'),
        ('healthy', 'degraded'),
        ('healthy', 'stopping'),
        ('healthy', 'crashed'),
        ('degraded', 'healthy'),
        ('degraded', 'stopping'),
        ('degraded', 'crashed'),
        ('stopping', 'stopped'),
        ('stopping', 'crashed')
    )
$$;

COMMENT ON FUNCTION pglive._transition_allowed(text, text) IS
    'The status lifecycle: starting -> healthy <-> degraded -> stopping -> stopped, and any '
    'non-final status -> crashed. stopped and crashed are final.';

CREATE OR REPLACE FUNCTION pglive._check_status_move()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;

    IF NOT pglive._transition_allowed(OLD.status, NEW.status) THEN
        RAISE EXCEPTION 'terminal instance % cannot move from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'PL004',
                  HINT = 'allowed: starting->healthy<->degraded->stopping->stopped, '
                         'starting|healthy|degraded|stopping->crashed';
    END IF;

    IF NEW.status = 'stopped' THEN
        NEW.stopped_at := coalesce(NEW.stopped_at, now());
    ELSIF NEW.status = 'crashed' THEN
        NEW.crash_detected_at := coalesce(NEW.crash_detected_at, now());
    END IF;

    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION pglive._record_status_change()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_previous text;
    v_event    text;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.status = OLD.status THEN
            RETURN NULL;
        END IF;

        v_previous := OLD.status;
    END IF;

    INSERT INTO pglive.terminal_health_history
        (terminal_instance_id, previous_status, new_status, reason, uptime_seconds)
    VALUES
        (NEW.id, v_previous, NEW.status, NEW.status_reason, pglive._uptime_seconds(NEW));

    v_event := CASE
        WHEN NEW.status = 'crashed' THEN 'crashed'
        WHEN NEW.status = 'degraded' THEN 'degraded'
        WHEN NEW.status = 'healthy' AND v_previous = 'degraded' THEN 'recovered'
        WHEN NEW.status = 'stopped' THEN 'stopped'
    END;

    IF v_event IS NOT NULL THEN
        PERFORM pglive._notify(v_event, NEW.machine_id, NEW.terminal_type, NEW.id,
            jsonb_build_object(
                'status', NEW.status,
                'previous_status', v_previous,
                'pid', NEW.pid,
                'hostname', NEW.hostname,
                'reason', left(NEW.status_reason, 500)));
    END IF;

    IF NEW.status = 'crashed' THEN
        PERFORM pglive._record_failure(NEW.machine_id, NEW.terminal_type, NEW.id,
                                       NEW.status_reason, pglive._uptime_seconds(NEW));
    END IF;

    RETURN NULL;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Recovery bookkeeping
-- ---------------------------------------------------------------------------------------------

-- Counts one failure of a slot and decides what follows: a restart after 1, 3 or 6 times the
-- restart delay (5, 15, 30 s by default), or a give-up after max_restart_attempts. A failure of
-- an instance that had run for stable_reset_seconds starts the count afresh.
CREATE OR REPLACE FUNCTION pglive._record_failure(p_machine_id uuid,
                                                  p_terminal_type text,
                                                  p_instance_id uuid,
                                                  p_reason text,
                                                  p_uptime_seconds numeric)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_state        pglive.recovery_state;
    v_max_attempts integer;
    v_delay        numeric;
BEGIN
    IF NOT (SELECT supervised FROM pglive.terminal_types WHERE terminal_type = p_terminal_type) THEN
        RETURN;
    END IF;

    INSERT INTO pglive.recovery_state (machine_id, terminal_type)
    VALUES (p_machine_id, p_terminal_type)
    ON CONFLICT (machine_id, terminal_type) DO NOTHING;

    SELECT *
    INTO v_state
    FROM pglive.recovery_state
    WHERE machine_id = p_machine_id AND terminal_type = p_terminal_type
    FOR UPDATE;

    IF v_state.gave_up_at IS NOT NULL THEN
        UPDATE pglive.recovery_state
        SET last_failure_at = now(), last_failure_reason = p_reason,
            last_failed_instance_id = p_instance_id, updated_at = now()
        WHERE machine_id = p_machine_id AND terminal_type = p_terminal_type;
        RETURN;
    END IF;

    IF p_uptime_seconds >= pglive._setting('stable_reset_seconds', p_machine_id) THEN
        v_state.attempts := 0;
    END IF;

    v_state.attempts := v_state.attempts + 1;
    v_max_attempts := pglive._setting('max_restart_attempts', p_machine_id);

    IF v_state.attempts > v_max_attempts THEN
        UPDATE pglive.recovery_state
        SET attempts = v_state.attempts - 1, last_failure_at = now(),
            last_failure_reason = p_reason, last_failed_instance_id = p_instance_id,
            restart_at = NULL, gave_up_at = now(), updated_at = now()
        WHERE machine_id = p_machine_id AND terminal_type = p_terminal_type;

        INSERT INTO pglive.recovery_events
            (machine_id, terminal_type, event, attempt, instance_id, reason)
        VALUES
            (p_machine_id, p_terminal_type, 'gave_up', v_state.attempts - 1, p_instance_id,
             format('gave up after %s restart attempts; last failure: %s', v_max_attempts, p_reason));

        PERFORM pglive._notify('gave_up', p_machine_id, p_terminal_type, p_instance_id,
            jsonb_build_object('attempts', v_max_attempts, 'reason', left(p_reason, 500)));
        RETURN;
    END IF;

    v_delay := pglive._setting('restart_delay_seconds', p_machine_id)
               * CASE v_state.attempts WHEN 1 THEN 1 WHEN 2 THEN 3 ELSE 6 END;

    UPDATE pglive.recovery_state
    SET attempts = v_state.attempts, last_failure_at = now(), last_failure_reason = p_reason,
        last_failed_instance_id = p_instance_id,
        restart_at = now() + v_delay * interval '1 second', updated_at = now()
    WHERE machine_id = p_machine_id AND terminal_type = p_terminal_type;

    INSERT INTO pglive.recovery_events
        (machine_id, terminal_type, event, attempt, delay_seconds, instance_id, reason)
    VALUES
        (p_machine_id, p_terminal_type, 'restart_scheduled', v_state.attempts, v_delay,
         p_instance_id, p_reason);
END
$$;

CREATE OR REPLACE FUNCTION pglive.recovery_decision(p_machine_id uuid,
                                                    p_terminal_type text,
                                                    p_now timestamptz DEFAULT NULL)
RETURNS TABLE (action text,
               attempt integer,
               max_attempts integer,
               delay_seconds numeric,
               restart_at timestamptz,
               reason text)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
#variable_conflict use_column
DECLARE
    v_now   timestamptz := coalesce(p_now, now());
    v_state pglive.recovery_state;
    v_max   integer := pglive._setting('max_restart_attempts', p_machine_id);
BEGIN
    PERFORM pglive._check_terminal_type(p_terminal_type);

    SELECT *
    INTO v_state
    FROM pglive.recovery_state rs
    WHERE rs.machine_id = p_machine_id AND rs.terminal_type = p_terminal_type;

    IF EXISTS (
        SELECT FROM pglive.terminal_instances ti
        WHERE ti.machine_id = p_machine_id
          AND ti.terminal_type = p_terminal_type
          AND ti.status = ANY (pglive._active_statuses())
    ) THEN
        RETURN QUERY SELECT 'running', coalesce(v_state.attempts, 0), v_max, 0::numeric,
                            NULL::timestamptz, 'an active instance exists'::text;
    ELSIF v_state.gave_up_at IS NOT NULL THEN
        RETURN QUERY SELECT 'gave_up', v_state.attempts, v_max, NULL::numeric, NULL::timestamptz,
                            format('gave up at %s; last failure: %s', v_state.gave_up_at,
                                   v_state.last_failure_reason);
    ELSIF v_state.restart_at IS NOT NULL THEN
        RETURN QUERY SELECT 'restart', v_state.attempts, v_max,
                            round(greatest(0, extract(epoch FROM v_state.restart_at - v_now))::numeric, 3),
                            v_state.restart_at, v_state.last_failure_reason;
    ELSE
        RETURN QUERY SELECT 'start', coalesce(v_state.attempts, 0), v_max, 0::numeric,
                            NULL::timestamptz, 'no instance is running'::text;
    END IF;
END
$$;

COMMENT ON FUNCTION pglive.recovery_decision(uuid, text, timestamptz) IS
    'What a launcher should do about a slot: running (leave it), start (now), restart (after '
    'delay_seconds; attempt n of max_attempts) or gave_up (do not start; see recovery_give_ups).';

CREATE OR REPLACE FUNCTION pglive.reset_recovery(p_machine_id uuid, p_terminal_type text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
BEGIN
    UPDATE pglive.recovery_state
    SET attempts = 0, restart_at = NULL, gave_up_at = NULL, updated_at = now()
    WHERE machine_id = p_machine_id AND terminal_type = p_terminal_type;

    IF FOUND THEN
        INSERT INTO pglive.recovery_events (machine_id, terminal_type, event, attempt, reason)
        VALUES (p_machine_id, p_terminal_type, 'reset', 0, 'restart attempts reset');

        -- Wakes the machine's launcher, which starts the terminal again at once.
        PERFORM pglive._notify('reset', p_machine_id, p_terminal_type, NULL);
    END IF;
END
$$;

COMMENT ON FUNCTION pglive.reset_recovery(uuid, text) IS
    'Forgets the restart attempts and any give-up of a slot, so its launcher starts it again '
    '(like systemctl reset-failed).';

-- ---------------------------------------------------------------------------------------------
-- Settings
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pglive.set_machine_setting(p_machine_id uuid, p_key text, p_value numeric)
RETURNS numeric
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
DECLARE
    v_setting pglive.settings;
BEGIN
    SELECT * INTO v_setting FROM pglive.settings WHERE key = p_key;

    IF NOT FOUND THEN
        PERFORM pglive._raise_unknown_setting(p_key);
    END IF;

    IF p_key = 'sweep_interval_seconds' THEN
        RAISE EXCEPTION 'sweep_interval_seconds is global and cannot be set per machine'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'UPDATE pglive.settings SET value = ... WHERE key = ''sweep_interval_seconds''';
    END IF;

    IF p_machine_id IS NULL THEN
        RAISE EXCEPTION 'a machine id is required to set % for one machine', p_key
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'global values live in pglive.settings';
    END IF;

    IF p_value IS NULL OR p_value NOT BETWEEN v_setting.min_value AND v_setting.max_value THEN
        RAISE EXCEPTION 'setting % = % is out of range [%, %]',
                p_key, coalesce(p_value::text, 'NULL'), v_setting.min_value, v_setting.max_value
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF p_key IN ('max_restart_attempts', 'error_min_operations') AND p_value <> trunc(p_value) THEN
        RAISE EXCEPTION 'setting % = % must be a whole number', p_key, p_value
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- The recovery mark must stay under the degradation mark, or a terminal would flap.
    IF (p_key = 'recovered_error_rate'
        AND p_value > pglive._setting('degraded_error_rate', p_machine_id))
       OR (p_key = 'degraded_error_rate'
           AND p_value < pglive._setting('recovered_error_rate', p_machine_id)) THEN
        RAISE EXCEPTION 'setting % = % would put recovered_error_rate above degraded_error_rate',
                p_key, p_value
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO pglive.machine_settings (machine_id, key, value)
    VALUES (p_machine_id, p_key, p_value)
    ON CONFLICT (machine_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now();

    RETURN p_value;
END
$$;

COMMENT ON FUNCTION pglive.set_machine_setting(uuid, text, numeric) IS
    'Overrides one setting of pglive.settings for one machine.';

-- ---------------------------------------------------------------------------------------------
-- Registration, heartbeat and graceful stop (what a terminal calls)
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pglive.register_terminal(p_terminal_type text,
                                                    p_machine_id uuid,
                                                    p_environment text,
                                                    p_pid integer,
                                                    p_hostname text,
                                                    p_heartbeat_interval numeric DEFAULT 10,
                                                    p_log_file_path text DEFAULT NULL)
RETURNS TABLE (instance_id uuid, token text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
#variable_conflict use_column
DECLARE
    v_timeout     numeric;
    v_token       text;
    v_instance_id uuid;
    v_previous    pglive.terminal_instances;
    v_running     pglive.terminal_instances;
BEGIN
    PERFORM pglive._check_terminal_type(p_terminal_type);

    -- Only a launcher may take a machine's launcher slot (else a terminal could lock it out).
    IF NOT (SELECT t.supervised FROM pglive.terminal_types t WHERE t.terminal_type = p_terminal_type)
       AND NOT pg_catalog.pg_has_role(session_user, 'pglive_launcher', 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" may not register a "%": that needs pglive_launcher',
                session_user, p_terminal_type
            USING ERRCODE = 'insufficient_privilege';
    END IF;

    IF p_environment IS NULL OR p_environment NOT IN ('production', 'development', 'testing') THEN
        RAISE EXCEPTION 'unknown environment "%"', coalesce(p_environment, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'one of production, development, testing';
    END IF;

    IF p_machine_id IS NULL OR p_pid IS NULL OR p_pid <= 0 OR coalesce(p_hostname, '') = '' THEN
        RAISE EXCEPTION 'machine id, a positive pid and a hostname are required (got %, %, %)',
                coalesce(p_machine_id::text, 'NULL'), coalesce(p_pid::text, 'NULL'),
                coalesce(p_hostname, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    v_timeout := pglive._setting('heartbeat_timeout_seconds', p_machine_id);

    IF p_heartbeat_interval IS NULL OR p_heartbeat_interval <= 0 THEN
        RAISE EXCEPTION 'heartbeat interval % s is not positive', coalesce(p_heartbeat_interval::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF p_heartbeat_interval >= v_timeout THEN
        RAISE EXCEPTION 'heartbeat interval % s is not below the heartbeat timeout % s of machine %',
                p_heartbeat_interval, v_timeout, p_machine_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('the timeout should be 2-3 times the interval: use an interval of '
                                'at most %s s, or raise the timeout with '
                                'SELECT pglive.set_machine_setting(%L, %L, %s)',
                                round(v_timeout / 2, 1), p_machine_id, 'heartbeat_timeout_seconds',
                                p_heartbeat_interval * 3);
    END IF;

    v_token := replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');

    SELECT *
    INTO v_previous
    FROM pglive.terminal_instances ti
    WHERE ti.machine_id = p_machine_id AND ti.terminal_type = p_terminal_type
    ORDER BY ti.started_at DESC
    LIMIT 1;

    BEGIN
        INSERT INTO pglive.terminal_instances
            (terminal_type, machine_id, environment, status_reason, pid, hostname,
             heartbeat_interval, log_file_path, token_hash, replaces_instance_id)
        VALUES
            (p_terminal_type, p_machine_id, p_environment, 'registered', p_pid, p_hostname,
             p_heartbeat_interval, p_log_file_path, pglive._token_hash(v_token),
             CASE WHEN v_previous.status = 'crashed' THEN v_previous.id END)
        RETURNING id INTO v_instance_id;
    EXCEPTION WHEN unique_violation THEN
        SELECT *
        INTO v_running
        FROM pglive.terminal_instances ti
        WHERE ti.machine_id = p_machine_id
          AND ti.terminal_type = p_terminal_type
          AND ti.status = ANY (pglive._active_statuses());

        RAISE EXCEPTION '% is already running on machine %: instance %, pid %, host %, status %, started %, last heartbeat %',
                p_terminal_type, p_machine_id, v_running.id, v_running.pid, v_running.hostname,
                v_running.status, v_running.started_at,
                coalesce(v_running.last_heartbeat::text, 'never')
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = 'terminal_instances_one_active_per_slot',
                  HINT = 'stop that instance first; if its process is gone, '
                         'SELECT pglive.mark_terminal_crashed(''<instance id>'', ''<reason>'') '
                         'frees the slot';
    END;

    -- The new instance is the pending restart, if one was scheduled.
    UPDATE pglive.recovery_state rs
    SET restart_at = NULL, updated_at = now()
    WHERE rs.machine_id = p_machine_id AND rs.terminal_type = p_terminal_type
      AND rs.restart_at IS NOT NULL;

    RETURN QUERY SELECT v_instance_id, v_token;
END
$$;

COMMENT ON FUNCTION pglive.register_terminal(text, uuid, text, integer, text, numeric, text) IS
    'Registers a new instance (status starting) and returns its id and secret token. Raises 23505 '
    'naming the running instance when the (machine, type) slot is taken.';

CREATE OR REPLACE FUNCTION pglive.heartbeat(p_instance_id uuid,
                                            p_token text,
                                            p_commands_delta bigint DEFAULT 0,
                                            p_errors_delta bigint DEFAULT 0,
                                            p_last_error text DEFAULT NULL,
                                            p_sequence bigint DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
DECLARE
    v_instance pglive.terminal_instances;
    v_fresh    boolean;
BEGIN
    IF coalesce(p_commands_delta, 0) < 0 OR coalesce(p_errors_delta, 0) < 0 THEN
        RAISE EXCEPTION 'heartbeat deltas must not be negative (commands %, errors %)',
                p_commands_delta, p_errors_delta
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    v_instance := pglive._authenticate(p_instance_id, p_token);

    IF NOT v_instance.status = ANY (pglive._active_statuses()) THEN
        PERFORM pglive._raise_fenced(v_instance);
    END IF;

    v_fresh := p_sequence IS NULL OR p_sequence > v_instance.last_beat_sequence;

    UPDATE pglive.terminal_instances
    SET last_heartbeat = now(),
        missed_heartbeats = 0,
        commands_processed = commands_processed
            + CASE WHEN v_fresh THEN coalesce(p_commands_delta, 0) ELSE 0 END,
        errors_encountered = errors_encountered
            + CASE WHEN v_fresh THEN coalesce(p_errors_delta, 0) ELSE 0 END,
        last_error = CASE WHEN v_fresh THEN coalesce(p_last_error, last_error) ELSE last_error END,
        last_beat_sequence = greatest(last_beat_sequence, coalesce(p_sequence, 0)),
        status = CASE WHEN status = 'starting' THEN 'healthy' ELSE status END,
        status_reason = CASE WHEN status = 'starting' THEN 'first heartbeat' ELSE status_reason END
    WHERE id = p_instance_id
    RETURNING * INTO v_instance;

    IF v_fresh AND (coalesce(p_commands_delta, 0) > 0 OR coalesce(p_errors_delta, 0) > 0) THEN
        INSERT INTO pglive.heartbeat_samples (terminal_instance_id, recorded_at, commands, errors)
        VALUES (p_instance_id, now(), coalesce(p_commands_delta, 0), coalesce(p_errors_delta, 0));
    END IF;

    RETURN v_instance.status;
END
$$;

COMMENT ON FUNCTION pglive.heartbeat(uuid, text, bigint, bigint, text, bigint) IS
    'Records that an instance is alive and adds its counter deltas; moves starting to healthy and '
    'returns the status. A retry with the same p_sequence adds nothing twice. Raises PL001 when '
    'the instance is no longer active (fenced), PL002 for a wrong token.';

CREATE OR REPLACE FUNCTION pglive.lock_active_instance(p_instance_id uuid, p_token text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
DECLARE
    v_status text;
BEGIN
    SELECT ti.status
    INTO v_status
    FROM pglive.terminal_instances ti
    WHERE ti.id = p_instance_id AND ti.token_hash = pglive._token_hash(p_token)
    FOR SHARE;

    RETURN coalesce(v_status = ANY (pglive._active_statuses()), false);
END
$$;

COMMENT ON FUNCTION pglive.lock_active_instance(uuid, text) IS
    'True when the instance is active and the token is its own. Locks the instance row until the '
    'calling transaction ends, so it cannot be marked crashed in between: put it in the statement '
    'that claims work, and a replaced (fenced) instance can never claim any.';

CREATE OR REPLACE FUNCTION pglive.begin_terminal_stop(p_instance_id uuid,
                                                      p_token text,
                                                      p_reason text DEFAULT 'graceful stop')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
DECLARE
    v_instance pglive.terminal_instances;
BEGIN
    v_instance := pglive._authenticate(p_instance_id, p_token);

    IF v_instance.status IN ('stopping', 'stopped') THEN
        RETURN v_instance.status;
    ELSIF v_instance.status = 'crashed' THEN
        PERFORM pglive._raise_fenced(v_instance);
    END IF;

    UPDATE pglive.terminal_instances
    SET status = 'stopping', status_reason = coalesce(p_reason, 'graceful stop'),
        last_heartbeat = now()
    WHERE id = p_instance_id;

    RETURN 'stopping';
END
$$;

COMMENT ON FUNCTION pglive.begin_terminal_stop(uuid, text, text) IS
    'First half of a graceful stop: the instance turns stopping while it finishes its work.';

CREATE OR REPLACE FUNCTION pglive.finish_terminal_stop(p_instance_id uuid,
                                                       p_token text,
                                                       p_commands_delta bigint DEFAULT 0,
                                                       p_errors_delta bigint DEFAULT 0,
                                                       p_last_error text DEFAULT NULL,
                                                       p_sequence bigint DEFAULT NULL,
                                                       p_reason text DEFAULT 'graceful stop')
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
DECLARE
    v_instance pglive.terminal_instances;
BEGIN
    v_instance := pglive._authenticate(p_instance_id, p_token);

    IF v_instance.status = 'stopped' THEN
        RETURN 'stopped';
    ELSIF v_instance.status <> 'stopping' THEN
        PERFORM pglive.begin_terminal_stop(p_instance_id, p_token, p_reason);
    END IF;

    -- Flush the last counters through the heartbeat, so the same deduplication applies.
    PERFORM pglive.heartbeat(p_instance_id, p_token, p_commands_delta, p_errors_delta,
                             p_last_error, p_sequence);

    UPDATE pglive.terminal_instances
    SET status = 'stopped', status_reason = coalesce(p_reason, 'graceful stop'), stopped_at = now()
    WHERE id = p_instance_id;

    RETURN 'stopped';
END
$$;

COMMENT ON FUNCTION pglive.finish_terminal_stop(uuid, text, bigint, bigint, text, bigint, text) IS
    'Second half of a graceful stop: flushes the final counters and marks the instance stopped.';

-- ---------------------------------------------------------------------------------------------
-- Crash detection (what the sweep, the launcher and operators call)
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pglive.detect_dead_terminals(p_timeout_seconds numeric DEFAULT NULL,
                                                        p_now timestamptz DEFAULT NULL,
                                                        p_machine_id uuid DEFAULT NULL)
RETURNS TABLE (instance_id uuid,
               machine_id uuid,
               terminal_type text,
               status text,
               pid integer,
               hostname text,
               last_heartbeat timestamptz,
               seconds_since_heartbeat numeric,
               timeout_seconds numeric)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
    -- Silence is counted from the last heartbeat (or the start, for a starting instance), but
    -- never from before the server started: while it was down no heartbeat could arrive.
    SELECT ti.id, ti.machine_id, ti.terminal_type, ti.status, ti.pid, ti.hostname,
           ti.last_heartbeat,
           round(extract(epoch FROM coalesce(p_now, now())
                 - coalesce(ti.last_heartbeat, ti.started_at))::numeric, 1),
           limits.timeout_seconds
    FROM pglive.terminal_instances ti
    CROSS JOIN LATERAL (
        SELECT coalesce(p_timeout_seconds,
                        pglive._setting('heartbeat_timeout_seconds', ti.machine_id)) AS timeout_seconds,
               greatest(coalesce(ti.last_heartbeat, ti.started_at),
                        pg_postmaster_start_time()) AS silent_since
    ) limits
    WHERE ti.status = ANY (pglive._active_statuses())
      AND (p_machine_id IS NULL OR ti.machine_id = p_machine_id)
      AND coalesce(p_now, now()) - limits.silent_since > limits.timeout_seconds * interval '1 second'
    ORDER BY ti.machine_id, ti.terminal_type
$$;

COMMENT ON FUNCTION pglive.detect_dead_terminals(numeric, timestamptz, uuid) IS
    'Read-only: active instances silent for longer than the timeout (default: each machine''s '
    'heartbeat_timeout_seconds, 30 s unless overridden). Silence is not counted while the server '
    'was down.';

CREATE OR REPLACE FUNCTION pglive.mark_terminal_crashed(p_instance_id uuid, p_reason text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
DECLARE
    v_instance pglive.terminal_instances;
BEGIN
    IF coalesce(btrim(p_reason), '') = '' THEN
        RAISE EXCEPTION 'a reason is required to mark instance % crashed', p_instance_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT * INTO v_instance FROM pglive.terminal_instances WHERE id = p_instance_id FOR UPDATE;

    IF NOT FOUND THEN
        PERFORM pglive._raise_unknown_instance(p_instance_id);
    END IF;

    IF NOT v_instance.status = ANY (pglive._active_statuses()) THEN
        RAISE NOTICE 'terminal instance % is already %, left as it is', p_instance_id, v_instance.status;
        RETURN 'already_' || v_instance.status;
    END IF;

    UPDATE pglive.terminal_instances
    SET status = 'crashed', status_reason = p_reason, crash_detected_at = now()
    WHERE id = p_instance_id;

    RETURN 'crashed';
END
$$;

COMMENT ON FUNCTION pglive.mark_terminal_crashed(uuid, text) IS
    'Marks an active instance crashed (NOTIFY on its machine''s channel, restart scheduled). '
    'Returns crashed, or already_stopped / already_crashed and changes nothing.';

CREATE OR REPLACE FUNCTION pglive.report_process_exit(p_machine_id uuid,
                                                      p_terminal_type text,
                                                      p_pid integer,
                                                      p_hostname text,
                                                      p_spawned_at timestamptz,
                                                      p_exit_code integer DEFAULT NULL,
                                                      p_signal integer DEFAULT NULL,
                                                      p_detail text DEFAULT NULL)
RETURNS TABLE (instance_id uuid, outcome text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
#variable_conflict use_column
DECLARE
    v_instance pglive.terminal_instances;
    v_how      text;
BEGIN
    v_how := CASE
        WHEN p_signal IS NOT NULL THEN format('killed by %s', pglive._signal_name(p_signal))
        WHEN p_exit_code IS NOT NULL THEN format('exited with code %s', p_exit_code)
        ELSE 'exited (exit status unknown)'
    END;

    -- The instance this process registered: same slot, pid and host, registered after spawn.
    SELECT *
    INTO v_instance
    FROM pglive.terminal_instances ti
    WHERE ti.machine_id = p_machine_id
      AND ti.terminal_type = p_terminal_type
      AND ti.pid = p_pid
      AND ti.hostname = p_hostname
      AND ti.started_at >= p_spawned_at - interval '1 second'
    ORDER BY ti.started_at DESC
    LIMIT 1
    FOR UPDATE;

    IF p_pid IS NULL THEN
        PERFORM pglive._record_failure(p_machine_id, p_terminal_type, NULL,
                                       format('could not be started: %s',
                                              coalesce(p_detail, 'no reason given')), 0);
        RETURN QUERY SELECT NULL::uuid, 'never_started'::text;
        RETURN;
    END IF;

    IF NOT FOUND THEN
        PERFORM pglive._record_failure(p_machine_id, p_terminal_type, NULL,
                                       format('process %s %s before it registered', p_pid, v_how), 0);
        RETURN QUERY SELECT NULL::uuid, 'never_registered'::text;
        RETURN;
    END IF;

    IF NOT v_instance.status = ANY (pglive._active_statuses()) THEN
        RETURN QUERY SELECT v_instance.id, 'already_' || v_instance.status;
        RETURN;
    END IF;

    IF v_instance.status = 'stopping' AND p_exit_code = 0 THEN
        UPDATE pglive.terminal_instances ti
        SET status = 'stopped', status_reason = 'process exited with code 0 while stopping'
        WHERE ti.id = v_instance.id;

        RETURN QUERY SELECT v_instance.id, 'stopped'::text;
        RETURN;
    END IF;

    UPDATE pglive.terminal_instances ti
    SET status = 'crashed', status_reason = format('process %s %s', p_pid, v_how)
    WHERE ti.id = v_instance.id;

    RETURN QUERY SELECT v_instance.id, 'crashed'::text;
END
$$;

COMMENT ON FUNCTION pglive.report_process_exit(uuid, text, integer, text, timestamptz, integer, integer, text) IS
    'Called by a launcher when a terminal process it watches has exited: marks its instance '
    'crashed (or stopped, when it exited 0 while stopping). A process that never registered, or '
    'could not be started at all (p_pid NULL, the reason in p_detail), counts as a failed start.';

CREATE OR REPLACE FUNCTION pglive.get_terminal_uptime(p_instance_id uuid, p_now timestamptz DEFAULT NULL)
RETURNS numeric
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
DECLARE
    v_instance pglive.terminal_instances;
BEGIN
    SELECT * INTO v_instance FROM pglive.terminal_instances WHERE id = p_instance_id;

    IF NOT FOUND THEN
        PERFORM pglive._raise_unknown_instance(p_instance_id);
    END IF;

    RETURN pglive._uptime_seconds(v_instance, p_now);
END
$$;

COMMENT ON FUNCTION pglive.get_terminal_uptime(uuid, timestamptz) IS
    'Seconds an instance has run: up to now, or up to its stop or crash.';

-- ---------------------------------------------------------------------------------------------
-- The sweep
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pglive.sweep(p_now timestamptz DEFAULT NULL, p_machine_id uuid DEFAULT NULL)
RETURNS TABLE (instance_id uuid,
               machine_id uuid,
               terminal_type text,
               action text,
               detail text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pglive
AS $$
#variable_conflict use_column
DECLARE
    v_now    timestamptz := coalesce(p_now, now());
    v_dead   record;
    v_rate   record;
    v_reason text;
BEGIN
    -- Moving the clock of a sweep that writes would let a caller crash healthy instances.
    IF p_now IS NOT NULL
       AND NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = session_user) THEN
        RAISE EXCEPTION 'only a superuser may sweep at another time than now (p_now %)', p_now
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'p_now exists for tests; call pglive.sweep() or pglive.sweep(NULL, machine)';
    END IF;

    -- 1. Missed heartbeats, counted like detect_dead_terminals counts silence.
    UPDATE pglive.terminal_instances ti
    SET missed_heartbeats = missed.n
    FROM (
        SELECT i.id,
               greatest(0, floor(extract(epoch FROM v_now - greatest(
                   coalesce(i.last_heartbeat, i.started_at), pg_postmaster_start_time()))
                   / i.heartbeat_interval))::integer AS n
        FROM pglive.terminal_instances i
        WHERE i.status = ANY (pglive._active_statuses())
          AND (p_machine_id IS NULL OR i.machine_id = p_machine_id)
    ) missed
    WHERE ti.id = missed.id AND ti.missed_heartbeats <> missed.n;

    -- 2. Silent instances are crashed. The status check in the UPDATE makes a concurrent sweep,
    --    stop or heartbeat win cleanly: a row changed meanwhile is simply skipped.
    FOR v_dead IN
        SELECT * FROM pglive.detect_dead_terminals(NULL, v_now, p_machine_id)
    LOOP
        v_reason := format('no heartbeat for %s s (timeout %s s), detected by the sweep',
                           v_dead.seconds_since_heartbeat, v_dead.timeout_seconds);

        UPDATE pglive.terminal_instances ti
        SET status = 'crashed', status_reason = v_reason, crash_detected_at = v_now
        WHERE ti.id = v_dead.instance_id AND ti.status = ANY (pglive._active_statuses());

        IF FOUND THEN
            RETURN QUERY SELECT v_dead.instance_id, v_dead.machine_id, v_dead.terminal_type,
                                'crashed'::text, v_reason;
        END IF;
    END LOOP;

    -- 3. Error rate over the window: healthy -> degraded at the high mark, back under the low one.
    FOR v_rate IN
        SELECT ti.id, ti.machine_id, ti.terminal_type, ti.status,
               coalesce(sum(hs.commands + hs.errors), 0) AS operations,
               coalesce(sum(hs.errors), 0) AS errors,
               pglive._setting('error_window_seconds', ti.machine_id) AS window_seconds,
               pglive._setting('error_min_operations', ti.machine_id) AS min_operations,
               pglive._setting('degraded_error_rate', ti.machine_id) AS degraded_rate,
               pglive._setting('recovered_error_rate', ti.machine_id) AS recovered_rate
        FROM pglive.terminal_instances ti
        LEFT JOIN pglive.heartbeat_samples hs
               ON hs.terminal_instance_id = ti.id
              AND hs.recorded_at > v_now - pglive._setting('error_window_seconds', ti.machine_id)
                                           * interval '1 second'
              AND hs.recorded_at <= v_now
        WHERE ti.status IN ('healthy', 'degraded')
          AND (p_machine_id IS NULL OR ti.machine_id = p_machine_id)
        GROUP BY ti.id
    LOOP
        v_reason := format('error rate %s%% over the last %s s (%s errors in %s operations)',
                           CASE WHEN v_rate.operations > 0
                                THEN round(100.0 * v_rate.errors / v_rate.operations, 1)
                                ELSE 0 END,
                           v_rate.window_seconds, v_rate.errors, v_rate.operations);

        IF v_rate.status = 'healthy'
           AND v_rate.operations >= v_rate.min_operations
           AND v_rate.errors >= v_rate.degraded_rate * v_rate.operations THEN
            UPDATE pglive.terminal_instances ti
            SET status = 'degraded', status_reason = v_reason
            WHERE ti.id = v_rate.id AND ti.status = 'healthy';

            IF FOUND THEN
                RETURN QUERY SELECT v_rate.id, v_rate.machine_id, v_rate.terminal_type,
                                    'degraded'::text, v_reason;
            END IF;
        ELSIF v_rate.status = 'degraded'
              AND (v_rate.operations < v_rate.min_operations
                   OR v_rate.errors < v_rate.recovered_rate * v_rate.operations) THEN
            UPDATE pglive.terminal_instances ti
            SET status = 'healthy', status_reason = 'recovered: ' || v_reason
            WHERE ti.id = v_rate.id AND ti.status = 'degraded';

            IF FOUND THEN
                RETURN QUERY SELECT v_rate.id, v_rate.machine_id, v_rate.terminal_type,
                                    'recovered'::text, v_reason;
            END IF;
        END IF;
    END LOOP;

    -- 4. Samples older than every window are no longer needed.
    IF p_machine_id IS NULL THEN
        DELETE FROM pglive.heartbeat_samples hs
        WHERE hs.recorded_at < v_now - greatest(
            3600, (SELECT max(value) FROM pglive.machine_settings WHERE key = 'error_window_seconds'),
            pglive._setting('error_window_seconds')) * interval '1 second';
    END IF;
END
$$;

COMMENT ON FUNCTION pglive.sweep(timestamptz, uuid) IS
    'One sweep: counts missed heartbeats, marks silent instances crashed, turns instances degraded '
    'or healthy by their error rate. Returns what it changed. pg_cron runs it every few seconds.';

-- A sweep that fails (a lock timeout, say) must not end the loop that pg_cron runs.
CREATE OR REPLACE FUNCTION pglive._sweep_logging_errors()
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_changes integer;
BEGIN
    SELECT count(*) INTO v_changes FROM pglive.sweep();
    RETURN v_changes;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pglive sweep failed: % (SQLSTATE %); the next sweep retries', SQLERRM, SQLSTATE;
    RETURN -1;
END
$$;

-- pg_cron 1.4 schedules by the minute only, so its job runs this procedure once a minute and the
-- procedure sweeps every sweep_interval_seconds until just before the next minute. It returns
-- before the boundary because pg_cron never starts a run while the previous one is still going:
-- overrunning would skip a whole minute. Each COMMIT makes that sweep's changes (and NOTIFYs)
-- visible at once. Must not be SECURITY DEFINER: such procedures cannot COMMIT.
CREATE OR REPLACE PROCEDURE pglive.run_sweeper(p_run_seconds numeric DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    v_deadline timestamptz;
    v_interval numeric;
BEGIN
    v_deadline := coalesce(clock_timestamp() + p_run_seconds * interval '1 second',
                           date_trunc('minute', clock_timestamp()) + interval '59.5 seconds');

    LOOP
        PERFORM pglive._sweep_logging_errors();
        COMMIT;

        v_interval := pglive._setting('sweep_interval_seconds');
        EXIT WHEN clock_timestamp() + v_interval * interval '1 second' >= v_deadline;
        PERFORM pg_sleep(v_interval);
        -- End the transaction that slept, so the next sweep's now() is the time it runs,
        -- not the time the sleep began.
        COMMIT;
    END LOOP;
END
$$;

COMMENT ON PROCEDURE pglive.run_sweeper(numeric) IS
    'Sweeps every sweep_interval_seconds until the end of the current minute (or p_run_seconds). '
    'Scheduled by pg_cron as job pglive-sweep; CALL it yourself where pg_cron is missing.';

-- ---------------------------------------------------------------------------------------------
-- Triggers
-- ---------------------------------------------------------------------------------------------

DROP TRIGGER IF EXISTS _100_check_status_move ON pglive.terminal_instances;
CREATE TRIGGER _100_check_status_move
    BEFORE UPDATE OF status ON pglive.terminal_instances
    FOR EACH ROW
    EXECUTE FUNCTION pglive._check_status_move();

DROP TRIGGER IF EXISTS _500_record_status_change ON pglive.terminal_instances;
CREATE TRIGGER _500_record_status_change
    AFTER INSERT OR UPDATE OF status ON pglive.terminal_instances
    FOR EACH ROW
    EXECUTE FUNCTION pglive._record_status_change();

INSERT INTO pglive.schema_migration (name) VALUES ('0002_functions') ON CONFLICT (name) DO NOTHING;
