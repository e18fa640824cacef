-- 0010_ald_services: the ALD terminals' own data, in schema ald, apart from pglive's.
--
-- readings            one row per read cycle of terminal1 (all mapped PLC values, as jsonb)
-- recipes, recipe_steps
--                     what terminal2 executes: valve, parameter, wait and repeat steps
-- recipe_commands     start / pause / resume / abort, queued for terminal2
-- recipe_runs         one row per started recipe, with its progress and outcome
-- parameter_commands  setpoint writes, queued for terminal3
--
-- A new command row sends NOTIFY on ald_recipe_commands or ald_parameter_commands with a
-- JSON payload {"machine_id": ..., "id": ...}; the services LISTEN and also poll, because a
-- notification sent while a service was disconnected is lost.
--
-- Commands are claimed with FOR UPDATE SKIP LOCKED by a statement that also calls
-- pglive.lock_active_instance(), so an instance that has been replaced (fenced) can never
-- take work, even between two of its heartbeats.
--
-- Safe to re-apply: everything is IF NOT EXISTS or CREATE OR REPLACE. Like every migration,
-- the file records itself in pglive.schema_migration as its last statement.

CREATE SCHEMA IF NOT EXISTS ald;

COMMENT ON SCHEMA ald IS
    'Data of the ALD terminals (readings, recipes, command queues); pglive itself lives in '
    'schema pglive.';

-- ---------------------------------------------------------------------------------------------
-- Readings
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS ald.readings (
    id            bigint      GENERATED ALWAYS AS IDENTITY,
    machine_id    uuid        NOT NULL,
    instance_id   uuid        NOT NULL,
    cycle         bigint      NOT NULL,
    scheduled_at  timestamptz NOT NULL,
    sampled_at    timestamptz NOT NULL,
    data          jsonb       NOT NULL,
    stored_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT readings_pkey PRIMARY KEY (id),
    -- A batch that is retried after a lost commit inserts nothing twice.
    CONSTRAINT readings_instance_cycle_key UNIQUE (instance_id, cycle),
    CONSTRAINT readings_data_is_object CHECK (jsonb_typeof(data) = 'object')
);

CREATE INDEX IF NOT EXISTS readings_machine_sampled_idx
    ON ald.readings (machine_id, sampled_at);

-- TODO: readings grow by 86,400 rows per machine and day and nothing prunes them; add a
-- retention job (pg_cron, like pglive's own pruning) once the retention period is decided.

COMMENT ON TABLE ald.readings IS
    'One row per successful read cycle of the PLC data service: cycle is the slot number on '
    'the instance''s fixed schedule (scheduled_at = start + cycle * period), data maps register '
    'names to values.';

-- ---------------------------------------------------------------------------------------------
-- Recipes
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS ald.recipes (
    id           bigint      GENERATED ALWAYS AS IDENTITY,
    name         text        NOT NULL,
    version      integer     NOT NULL DEFAULT 1,
    description  text        NOT NULL DEFAULT '',
    created_by   text        NOT NULL DEFAULT current_user,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT recipes_pkey PRIMARY KEY (id),
    CONSTRAINT recipes_name_version_key UNIQUE (name, version),
    CONSTRAINT recipes_version_positive CHECK (version >= 1)
);

CREATE TABLE IF NOT EXISTS ald.recipe_steps (
    recipe_id     bigint           NOT NULL,
    position      integer          NOT NULL,
    kind          text             NOT NULL,
    target        text,
    value         double precision,
    duration_ms   integer,
    repeat_count  integer,
    block_length  integer,
    comment       text             NOT NULL DEFAULT '',
    CONSTRAINT recipe_steps_pkey PRIMARY KEY (recipe_id, position),
    CONSTRAINT recipe_steps_recipe_fkey FOREIGN KEY (recipe_id)
        REFERENCES ald.recipes (id) ON DELETE CASCADE,
    CONSTRAINT recipe_steps_position_positive CHECK (position >= 1),
    CONSTRAINT recipe_steps_kind_known
        CHECK (kind IN ('open_valve', 'close_valve', 'set_parameter', 'wait', 'repeat')),
    CONSTRAINT recipe_steps_valve_has_target
        CHECK (kind NOT IN ('open_valve', 'close_valve') OR target IS NOT NULL),
    CONSTRAINT recipe_steps_parameter_has_target_and_value
        CHECK (kind <> 'set_parameter' OR (target IS NOT NULL AND value IS NOT NULL)),
    CONSTRAINT recipe_steps_wait_has_duration
        CHECK (kind <> 'wait' OR duration_ms >= 0),
    CONSTRAINT recipe_steps_repeat_has_count_and_block
        CHECK (kind <> 'repeat' OR (repeat_count >= 1 AND block_length >= 1))
);

COMMENT ON TABLE ald.recipe_steps IS
    'Steps in position order. A repeat step runs the block_length steps after it '
    'repeat_count times (blocks may nest); targets are register-map names, checked by the '
    'recipe service before a run starts.';

-- ---------------------------------------------------------------------------------------------
-- Recipe commands and runs
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS ald.recipe_commands (
    id            bigint      GENERATED ALWAYS AS IDENTITY,
    machine_id    uuid        NOT NULL,
    command       text        NOT NULL,
    recipe_id     bigint,
    requested_by  text        NOT NULL DEFAULT current_user,
    status        text        NOT NULL DEFAULT 'queued',
    error         text,
    claimed_by    uuid,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    claimed_at    timestamptz,
    finished_at   timestamptz,
    CONSTRAINT recipe_commands_pkey PRIMARY KEY (id),
    CONSTRAINT recipe_commands_recipe_fkey FOREIGN KEY (recipe_id) REFERENCES ald.recipes (id),
    CONSTRAINT recipe_commands_command_known
        CHECK (command IN ('start', 'pause', 'resume', 'abort')),
    CONSTRAINT recipe_commands_start_has_recipe
        CHECK (command <> 'start' OR recipe_id IS NOT NULL),
    CONSTRAINT recipe_commands_status_known CHECK (status IN ('queued', 'done', 'failed')),
    CONSTRAINT recipe_commands_failed_has_error CHECK (status <> 'failed' OR error IS NOT NULL)
);

CREATE INDEX IF NOT EXISTS recipe_commands_queued_idx
    ON ald.recipe_commands (machine_id, id)
    WHERE status = 'queued';

COMMENT ON TABLE ald.recipe_commands IS
    'Commands for the recipe service of one machine. pause, resume and abort act on the '
    'machine''s unfinished run. A command is claimed and settled (done or failed) in one '
    'transaction, so a crash leaves it queued, never half taken.';

CREATE TABLE IF NOT EXISTS ald.recipe_runs (
    id                bigint      GENERATED ALWAYS AS IDENTITY,
    machine_id        uuid        NOT NULL,
    recipe_id         bigint      NOT NULL,
    start_command_id  bigint      NOT NULL,
    instance_id       uuid        NOT NULL,
    state             text        NOT NULL DEFAULT 'running',
    outcome           text,
    current_step      integer,
    current_cycle     integer,
    total_cycles      integer,
    steps_done        bigint      NOT NULL DEFAULT 0,
    error             text,
    started_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    CONSTRAINT recipe_runs_pkey PRIMARY KEY (id),
    CONSTRAINT recipe_runs_recipe_fkey FOREIGN KEY (recipe_id) REFERENCES ald.recipes (id),
    CONSTRAINT recipe_runs_start_command_fkey FOREIGN KEY (start_command_id)
        REFERENCES ald.recipe_commands (id),
    -- One start command starts at most one run: a run is never started twice.
    CONSTRAINT recipe_runs_start_command_key UNIQUE (start_command_id),
    CONSTRAINT recipe_runs_state_known CHECK (state IN ('running', 'paused', 'finished')),
    CONSTRAINT recipe_runs_outcome_known
        CHECK (outcome IN ('completed', 'aborted', 'failed', 'interrupted')),
    CONSTRAINT recipe_runs_finished_has_outcome
        CHECK ((state = 'finished') = (outcome IS NOT NULL AND finished_at IS NOT NULL))
);

-- One chamber per machine: at most one run that is not finished.
CREATE UNIQUE INDEX IF NOT EXISTS recipe_runs_one_unfinished_per_machine
    ON ald.recipe_runs (machine_id)
    WHERE state <> 'finished';

COMMENT ON TABLE ald.recipe_runs IS
    'Recipe executions. instance_id is the recipe-service instance that runs it; a run left '
    'unfinished by an instance that died is marked interrupted by the next one, never resumed '
    'silently.';

-- ---------------------------------------------------------------------------------------------
-- Parameter commands
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS ald.parameter_commands (
    id            bigint           GENERATED ALWAYS AS IDENTITY,
    machine_id    uuid             NOT NULL,
    name          text             NOT NULL,
    value         double precision NOT NULL,
    requested_by  text             NOT NULL DEFAULT current_user,
    status        text             NOT NULL DEFAULT 'queued',
    error         text,
    written_value double precision,
    read_back     double precision,
    claimed_by    uuid,
    requested_at  timestamptz      NOT NULL DEFAULT now(),
    claimed_at    timestamptz,
    finished_at   timestamptz,
    CONSTRAINT parameter_commands_pkey PRIMARY KEY (id),
    CONSTRAINT parameter_commands_status_known
        CHECK (status IN ('queued', 'running', 'done', 'failed')),
    CONSTRAINT parameter_commands_failed_has_error
        CHECK (status <> 'failed' OR error IS NOT NULL)
);

CREATE INDEX IF NOT EXISTS parameter_commands_queued_idx
    ON ald.parameter_commands (machine_id, id)
    WHERE status = 'queued';

COMMENT ON TABLE ald.parameter_commands IS
    'Setpoint writes for the parameter service. running means claimed and being written; a '
    'running command whose instance died is failed by the next instance (the write may or may '
    'not have reached the PLC), never repeated silently.';

-- ---------------------------------------------------------------------------------------------
-- Wake-ups
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION ald._notify_new_command()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- The payload names the row, so notifications of one transaction never collapse and a
    -- service can ignore other machines' commands.
    PERFORM pg_catalog.pg_notify(
        TG_ARGV[0],
        pg_catalog.json_build_object('machine_id', NEW.machine_id, 'id', NEW.id)::text);
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION ald._notify_new_command() IS
    'Trigger: NOTIFY the channel given as trigger argument that a command row was queued.';

CREATE OR REPLACE TRIGGER _500_notify_recipe_command
    AFTER INSERT ON ald.recipe_commands
    FOR EACH ROW
    EXECUTE FUNCTION ald._notify_new_command('ald_recipe_commands');

CREATE OR REPLACE TRIGGER _500_notify_parameter_command
    AFTER INSERT ON ald.parameter_commands
    FOR EACH ROW
    EXECUTE FUNCTION ald._notify_new_command('ald_parameter_commands');

-- ---------------------------------------------------------------------------------------------
-- Rights of the terminals
-- ---------------------------------------------------------------------------------------------

-- The terminals log in as members of pglive_terminal (a NOLOGIN group role, 0001).
GRANT USAGE ON SCHEMA ald TO pglive_terminal;
GRANT SELECT, INSERT ON ald.readings TO pglive_terminal;
-- INSERT on recipes and steps is for --demo, which loads the demo recipe.
GRANT SELECT, INSERT ON ald.recipes, ald.recipe_steps TO pglive_terminal;
GRANT SELECT, INSERT, UPDATE ON ald.recipe_commands, ald.recipe_runs TO pglive_terminal;
GRANT SELECT, INSERT, UPDATE ON ald.parameter_commands TO pglive_terminal;

INSERT INTO pglive.schema_migration (name)
VALUES ('0010_ald_services')
ON CONFLICT (name) DO NOTHING;
