"""Development tooling that is not shipped (not part of the installed package): the embedded
servers (embedded.py), the demo (demo.py), the relay-fleet harness shared by the tests, the
benchmarks and the soak (fleet.py), and the soak itself (soak.py, soak_report.py)."""
