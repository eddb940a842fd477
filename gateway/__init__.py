"""The authenticating reverse proxy; gateway.core holds what it shares with the admin service."""
