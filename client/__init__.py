"""The zchat client: a library for bots (``client.lib``) and, on top of it, the CLI."""
