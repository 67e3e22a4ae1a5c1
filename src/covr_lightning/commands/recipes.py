"""``covr-lightning recipes``: list the packaged recipes with the first line of their header."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from covr_lightning.recipe_files import list_recipes, packaged_recipes_dir


def run(args: argparse.Namespace) -> int:
    """Print a table of the packaged recipes."""
    table = Table(title=f"packaged recipes ({packaged_recipes_dir()})", title_justify="left")
    table.add_column("recipe", style="bold", no_wrap=True)  # names are typed: never cut them
    table.add_column("what it runs")
    for name, summary in list_recipes():
        table.add_row(name, summary)
    Console().print(table)
    return 0
