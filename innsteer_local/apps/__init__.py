"""Applications on top of the library: the CLI, chat, server, bench and doctor."""
