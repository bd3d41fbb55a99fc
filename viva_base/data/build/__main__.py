"""``python -m viva_base.data.build recipe=recipes/data_build.yaml [key=value ...] [--shard i/n]``."""
from .cli import cli

if __name__ == "__main__":
    raise SystemExit(cli())
