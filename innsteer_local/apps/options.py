"""Command-line options that several commands share, each written once (name, default, help)."""

from __future__ import annotations

import click

MODEL_HELP = "registry model (see `models list`) or a local .gguf path [default: smollm2-135m]"
FLOW_HELP = "[NAME=]FILE[:STRENGTH][@GATE]: a flow file or shipped flow name; repeatable"
RPC_HELP = ("HOST:PORT[,HOST:PORT]: split the model's layers across these rpc-servers (llama.cpp's RPC backend; "
            "scripts/build_rpc_server.sh builds rpc-server; keep it off untrusted networks)")

model = click.option("--model", "-m", default=None, help=MODEL_HELP)
threads = click.option("--threads", type=click.IntRange(1), default=None, help="[default: all cores]")
seed = click.option("--seed", "-s", type=int, default=0, show_default=True)
rpc = click.option("--rpc", default=None, metavar="HOST:PORT[,...]", help=RPC_HELP)
