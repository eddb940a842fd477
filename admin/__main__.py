"""`python -m admin` runs the credgate command."""

from admin.cli import main

main()
