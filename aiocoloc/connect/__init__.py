"""Connecting: asyncio's entry points and ``install()`` (``api``), the client's
upgrade (``agreement``), the handshake on the control socket
(``handshake``), the host registry of aiocoloc servers (``registry``), the
upgrade and trust policy (``policy``) and this process's pools
(``colocation``).  The public names are re-exported by ``aiocoloc``."""
