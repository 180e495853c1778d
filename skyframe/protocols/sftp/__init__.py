"""SFTP servers, as a built-in protocol plugin.

``backend``: the options, host keys, the connection (sshfs, asyncssh), what SSH and SFTP
errors mean; ``ssh_wire``: the SSH packets of one event-loop turn sent in one write;
``transfer``: resumable uploads through a hidden temporary file, renamed into place;
``plugin``: the hooks.
"""
