"""Print docs/cli.md, the command-line reference, from dms-llm's argument parser:

    python scripts/flag_reference.py > docs/cli.md
"""

from dms_llm.cli import flag_reference

print(flag_reference(), end="")
