"""Fakes for tests: stand-ins that behave like the real thing, in-process and on loopback.

- `clock`: `FakeClock`, a monotonic clock moved by hand (its `sleep` advances it exactly), and
  `FakeCancel`, an event that is set after some fake time.
- `recorder`: `Recorder`, a plugin that collects the lifecycle events of a run.
- `proxy`: `CountingProxy`, a loopback TCP proxy that counts bytes and can cut connections.
- `gcs_faithful`: `FaithfulGCS`, a GCS server faithful to the resumable-upload protocol.

Real servers (SeaweedFS, sshd, fake-gcs-server, Azurite, squid) are started by
`tests/servers.py`, not faked here.
"""
