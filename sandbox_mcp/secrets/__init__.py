"""Secrets a workspace can use but never read: placeholders inside, the values only in a host-side proxy.

``settings`` (what the server's operator configures), ``rewrite`` (where a placeholder may become its
value: pure), ``files`` (what the server tells the proxy), ``firewall`` (the proxy's port, open to
workspaces with secrets), ``proxy`` (the worker's ASGI app: uvicorn in, httpcore out), ``supervisor`` (the
proxy process: root, forks the unprivileged worker), ``service`` (what the manager calls).
"""

# Only the settings here: config.py imports them, and the service imports the network code, which
# imports config (import sandbox_mcp.secrets.service for SecretsService).
from .settings import SecretName, SecretSpec, SecretsProxySettings, read_value

__all__ = ["SecretName", "SecretSpec", "SecretsProxySettings", "read_value"]
