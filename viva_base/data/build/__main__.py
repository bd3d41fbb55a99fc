"""``python -m viva_base.data.build recipe=recipes/data_build.yaml [key=value ...] [--shard i/n]``."""
from .cli import cli

if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(cli)
