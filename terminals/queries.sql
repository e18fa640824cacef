-- The SQL the ALD terminals send (schema ald, sql/0010_ald_services.sql). Each block starts
-- with `-- name: NAME`, then one line saying what it does; parameters are %(named)s.
--
-- Every statement that claims a command calls pglive.lock_active_instance() in the same
-- statement: a replaced (fenced) instance claims nothing, even between its heartbeats.

-- name: listen_parameter_commands
-- Be woken when a parameter command is queued (sql/0010 trigger).
LISTEN ald_parameter_commands

-- name: listen_recipe_commands
-- Be woken when a recipe command is queued (sql/0010 trigger).
LISTEN ald_recipe_commands

-- name: insert_reading
-- Store one read cycle if this instance is still active; a retried batch inserts nothing twice.
INSERT INTO ald.readings (machine_id, instance_id, cycle, scheduled_at, sampled_at, data)
SELECT %(machine_id)s::uuid, %(instance_id)s::uuid, %(cycle)s::bigint,
       %(scheduled_at)s::timestamptz, %(sampled_at)s::timestamptz, %(data)s::jsonb
WHERE pglive.lock_active_instance(%(instance_id)s::uuid, %(token)s)
ON CONFLICT ON CONSTRAINT readings_instance_cycle_key DO NOTHING

-- name: claim_parameter_command
-- Take the oldest queued parameter write of this machine, if this instance is still active.
UPDATE ald.parameter_commands
SET status = 'running', claimed_by = %(instance_id)s, claimed_at = now()
WHERE id = (
    SELECT id
    FROM ald.parameter_commands
    WHERE machine_id = %(machine_id)s
      AND status = 'queued'
      AND pglive.lock_active_instance(%(instance_id)s, %(token)s)
    ORDER BY id
    FOR UPDATE SKIP LOCKED
    LIMIT 1)
RETURNING id, name, value, requested_by

-- name: finish_parameter_command
-- Settle a claimed parameter write as done or failed.
UPDATE ald.parameter_commands
SET status = %(status)s, error = %(error)s, written_value = %(written_value)s,
    read_back = %(read_back)s, finished_at = now()
WHERE id = %(id)s AND claimed_by = %(instance_id)s AND status = 'running'

-- name: queue_parameter_command
-- Queue a parameter write (used by --demo; operators insert rows the same way).
INSERT INTO ald.parameter_commands (machine_id, name, value, requested_by)
VALUES (%(machine_id)s, %(name)s, %(value)s, %(requested_by)s)
RETURNING id

-- name: fail_orphaned_parameter_commands
-- Fail writes claimed but never settled (the instance died, or lost the database before it
-- recorded the result); run on every (re)connect, when this instance has none in hand.
UPDATE ald.parameter_commands
SET status = 'failed', finished_at = now(),
    error = format('interrupted: instance %%s did not confirm the write; check %%s on the PLC '
                   'and queue it again if needed', claimed_by, name)
WHERE machine_id = %(machine_id)s
  AND status = 'running'
  AND pglive.lock_active_instance(%(instance_id)s, %(token)s)
RETURNING id, name, claimed_by

-- name: claim_recipe_command
-- Take the oldest queued recipe command of this machine, if this instance is still active.
UPDATE ald.recipe_commands
SET claimed_by = %(instance_id)s, claimed_at = now()
WHERE id = (
    SELECT id
    FROM ald.recipe_commands
    WHERE machine_id = %(machine_id)s
      AND status = 'queued'
      AND pglive.lock_active_instance(%(instance_id)s, %(token)s)
    ORDER BY id
    FOR UPDATE SKIP LOCKED
    LIMIT 1)
RETURNING id, command, recipe_id, requested_by

-- name: finish_recipe_command
-- Settle a recipe command as done or failed (in the transaction that claimed it).
UPDATE ald.recipe_commands
SET status = %(status)s, error = %(error)s, finished_at = now()
WHERE id = %(id)s

-- name: recipe
-- One recipe's name and version.
SELECT id, name, version
FROM ald.recipes
WHERE id = %(recipe_id)s

-- name: recipe_steps
-- A recipe's steps in order.
SELECT position, kind, target, value, duration_ms, repeat_count, block_length
FROM ald.recipe_steps
WHERE recipe_id = %(recipe_id)s
ORDER BY position

-- name: unfinished_run
-- The machine's run that is not finished, if any.
SELECT id, recipe_id, instance_id, state
FROM ald.recipe_runs
WHERE machine_id = %(machine_id)s AND state <> 'finished'

-- name: insert_run
-- Start a run for a start command.
INSERT INTO ald.recipe_runs (machine_id, recipe_id, start_command_id, instance_id,
                             total_cycles)
VALUES (%(machine_id)s, %(recipe_id)s, %(command_id)s, %(instance_id)s, %(total_cycles)s)
RETURNING id

-- name: update_run_progress
-- Record where a run is.
UPDATE ald.recipe_runs
SET state = %(state)s, current_step = %(current_step)s, current_cycle = %(current_cycle)s,
    steps_done = %(steps_done)s, updated_at = now()
WHERE id = %(id)s AND state <> 'finished'

-- name: finish_run
-- Record how a run ended.
UPDATE ald.recipe_runs
SET state = 'finished', outcome = %(outcome)s, error = %(error)s,
    current_step = %(current_step)s, current_cycle = %(current_cycle)s,
    steps_done = %(steps_done)s, updated_at = now(), finished_at = now()
WHERE id = %(id)s AND state <> 'finished'

-- name: interrupt_orphaned_runs
-- Mark interrupted the runs that another, now dead, instance left unfinished.
UPDATE ald.recipe_runs
SET state = 'finished', outcome = 'interrupted', updated_at = now(), finished_at = now(),
    error = format('recipe-service instance %%s stopped at step %%s, cycle %%s; not resumed, '
                   'because the chamber state after a crash is unknown',
                   instance_id, coalesce(current_step::text, '-'),
                   coalesce(current_cycle::text, '-'))
WHERE machine_id = %(machine_id)s
  AND state <> 'finished'
  AND instance_id <> %(instance_id)s
  AND pglive.lock_active_instance(%(instance_id)s, %(token)s)
RETURNING id, recipe_id, instance_id, current_step, current_cycle

-- name: insert_demo_recipe
-- Create the demo recipe once; returns nothing when it already exists.
INSERT INTO ald.recipes (name, version, description)
VALUES (%(name)s, %(version)s, %(description)s)
ON CONFLICT ON CONSTRAINT recipes_name_version_key DO NOTHING
RETURNING id

-- name: recipe_by_name
-- A recipe by name and version.
SELECT id
FROM ald.recipes
WHERE name = %(name)s AND version = %(version)s

-- name: insert_recipe_step
-- Add one step to a recipe.
INSERT INTO ald.recipe_steps (recipe_id, position, kind, target, value, duration_ms,
                              repeat_count, block_length, comment)
VALUES (%(recipe_id)s, %(position)s, %(kind)s, %(target)s, %(value)s, %(duration_ms)s,
        %(repeat_count)s, %(block_length)s, %(comment)s)

-- name: queue_recipe_start
-- Queue a start command for a recipe on this machine.
INSERT INTO ald.recipe_commands (machine_id, command, recipe_id, requested_by)
VALUES (%(machine_id)s, 'start', %(recipe_id)s, %(requested_by)s)
RETURNING id
