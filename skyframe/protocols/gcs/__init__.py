"""Google Cloud Storage (and its emulators), as a built-in protocol plugin.

``backend``: the options, the connection (gcsfs), what GCS's errors mean; ``transfer``:
single, batched and resumable uploads, and cancelling them; ``plugin``: the hooks.
"""
