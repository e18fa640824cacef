"""No password of a DSN ever reaches an error message."""

from __future__ import annotations

import pytest

from pglive import db, errors


@pytest.mark.parametrize(
    "dsn",
    [
        "host=/tmp password=correct horse battery",
        "host=/tmp password = 'correct horse",
        "postgresql://alice:correct horse@localhost/db?x",
    ],
)
def test_an_unparsable_dsn_shows_no_part_of_its_password(dsn):
    with pytest.raises(errors.ConfigurationError) as raised:
        db.check_dsn(dsn)

    message = str(raised.value)
    assert message.startswith("invalid DSN")
    for word in ("correct", "horse", "battery"):
        assert word not in message


def test_redact_hides_passwords_of_dsns_and_urls():
    assert errors.redact("password=hunter2 host=x") == "password=*** host=x"
    assert errors.redact("postgresql://bob:hunter2@db/x") == "postgresql://bob:***@db/x"
