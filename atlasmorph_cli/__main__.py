"""`python -m atlasmorph_cli` runs the same command-line interface as `atlasmorph`."""
from .cli import console_entry

console_entry()
