"""`python -m monitor` is `hopwatch`."""

from monitor.cli import main

main()
