"""The admin service and the credgate command; admin.devenv is the developer environment."""
