"""`oneha agent`, the host side of issue 13 (docs/agent.md): `core` decides, `heartbeat`, `visibility` and
`watchdog` touch the world, `service` runs the loop, `cli` is the command."""
