from relay.migrate import head_revision, known_revisions, schema_state


def test_schema_states_for_rolling_upgrades() -> None:
    assert schema_state(head_revision()) == "current"
    assert schema_state(None) == "behind"
    older = sorted(known_revisions() - {head_revision()})
    assert older and all(schema_state(rev) == "behind" for rev in older)
    # A revision this release does not know was written by a newer release: keep running.
    assert schema_state("9999_from_the_future") == "ahead"
