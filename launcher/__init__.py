"""The per-machine launcher of pglive: starts terminals and restarts them as told."""
