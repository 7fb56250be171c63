"""`oneha detect`: fast, proven failure detection (issue 13). See docs/detection.md.

Layers, bottom up: `targets` (the hosts, from oned), `probe` (one asyncio round of every host's management ports),
`misses` (this instance's consecutive misses), `quorum` (views shared through Redis, suspects, storm guard),
`heartbeats` (the storage heartbeats on this detector's own clock), `proof` (what a heartbeat proves: pure),
`lease` (one decider per host), `states` (the live view in Redis), `decide` (heartbeat veto, BMC, heartbeat proof,
the report), `beacon`, `metrics`, `service` (the loop), `cli`.
"""
