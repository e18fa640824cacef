"""The three ALD terminals kept alive by pglive, and the PLC they talk to."""
