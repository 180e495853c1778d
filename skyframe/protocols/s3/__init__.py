"""S3 and S3-compatible stores, as a built-in protocol plugin.

``backend``: the options, the connection (s3fs), one request through s3fs, what S3's errors
mean; ``direct``: the light client for small objects, signed by ``sigv4``; ``transfer``:
single, batched and resumable multipart uploads, and cancelling them; ``plugin``: the hooks.
"""
